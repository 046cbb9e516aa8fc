"""BriVL named sizes: ``brivl-lite0-minilm`` (EfficientNet-Lite0 + all-MiniLM-L6-v2, both pretrained and
offline), ``brivl-tiny`` (the same encoders, small heads: tests) and ``brivl-swin-micro`` (a Swin image backbone
trained from scratch, MSPP over its last map; all-MiniLM-L6-v2)."""

from __future__ import annotations

from typing import Any

from vlkit.models.brivl.model import BriVL, BriVLConfig
from vlkit.models.io import config_from_dict
from vlkit.models.preprocess import Preprocess
from vlkit.models.registry import register_model
from vlkit.modules.encoders.swin import swin_config


def brivl(**fields: Any) -> BriVL:
    """A BriVL from :class:`BriVLConfig` fields (nested ``preprocess`` as a dict is accepted)."""
    return BriVL(config_from_dict(BriVLConfig, fields, "brivl"))


@register_model("brivl-lite0-minilm")
def brivl_lite0_minilm(**overrides: Any) -> BriVL:
    return brivl(**overrides)


@register_model("brivl-tiny")
def brivl_tiny(**overrides: Any) -> BriVL:
    sizes = dict(embed_dim=32, image_width=64, image_layers=1, image_heads=2, text_width=64, text_layers=1,
                 text_heads=2, mlp_ratio=2.0, mspp_scales=(1, 2), queue_size=64)
    return brivl(**{**sizes, **overrides})


@register_model("brivl-swin-micro")
def brivl_swin_micro(**overrides: Any) -> BriVL:
    swin = swin_config("swin-micro")
    sizes = dict(embed_dim=32, backbone="swin", backbone_pretrained=False, swin=swin,
                 trainable_backbone_blocks=sum(swin.depths), image_width=64, image_layers=1, image_heads=2,
                 text_width=64, text_layers=1, text_heads=2, mlp_ratio=2.0, mspp_scales=(1, 2), queue_size=64,
                 preprocess=Preprocess(image_size=swin.image_size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                                       context_length=32, tokenizer=None))
    return brivl(**{**sizes, **overrides})
