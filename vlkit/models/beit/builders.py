"""BEiT named sizes: ``beit-tiny`` (32 px, 4x4 patches, a 2-layer ViT of width 64: tests) and ``beit-small``
(64 px, 8x8 patches, a 4-layer ViT of width 128: the shipped recipe). ``vocab_size`` follows the tokenizer: the
trainer sets it from the ``beit`` task's ``tokenizer_run``."""

from __future__ import annotations

from typing import Any

from vlkit.models.beit.model import BEiT, BEiTConfig
from vlkit.models.io import config_from_dict
from vlkit.models.registry import register_model

_VISION = ("image_size", "patch_size", "width", "layers", "heads", "mlp_ratio", "act")


def beit(**fields: Any) -> BEiT:
    """A BEiT from :class:`BEiTConfig` fields; the ViT's sizes may be given flat (``width=...``) or as ``vision``."""
    vision = dict(fields.pop("vision", {}) or {})
    vision.update({k: fields.pop(k) for k in _VISION if k in fields})
    size = vision.get("image_size", 32)
    fields.setdefault("preprocess", dict(image_size=size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                                         context_length=1))
    return BEiT(config_from_dict(BEiTConfig, {**fields, "vision": vision}, "beit"))


@register_model("beit-tiny")
def beit_tiny(**overrides: Any) -> BEiT:
    """For tests: 32 px images, 8 px patches (4x4 grid), width 64, 2 layers, 2 heads."""
    sizes = dict(image_size=32, patch_size=8, width=64, layers=2, heads=2, mlp_ratio=2.0, act="gelu",
                 vocab_size=64, mask_ratio=0.4)
    return beit(**{**sizes, **overrides})


@register_model("beit-small")
def beit_small(**overrides: Any) -> BEiT:
    """64 px images, 8 px patches (8x8 grid), width 128, 4 layers, 4 heads."""
    sizes = dict(image_size=64, patch_size=8, width=128, layers=4, heads=4, mlp_ratio=4.0, act="gelu",
                 vocab_size=128, mask_ratio=0.4)
    return beit(**{**sizes, **overrides})


__all__ = ["beit", "beit_small", "beit_tiny"]
