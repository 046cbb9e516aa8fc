"""MAE named sizes: ``mae-vit-tiny`` (tests, CPU), ``mae-vit-small``, ``mae-vit-base`` (ViT-B/16, 224 px)."""

from __future__ import annotations

from typing import Any

from vlkit.models.io import config_from_dict
from vlkit.models.mae.model import MAE, MAE_MEAN, MAE_STD, MAEConfig
from vlkit.models.preprocess import Preprocess
from vlkit.models.registry import register_model


def mae(image_size: int = 224, mean: tuple[float, float, float] = MAE_MEAN,
        std: tuple[float, float, float] = MAE_STD, **fields: Any) -> MAE:
    """An MAE of any size; the preprocessing follows ``image_size``.

    Args:
        image_size: input side in pixels.
        mean, std: image normalisation.
        fields: further :class:`MAEConfig` fields (``width``, ``mask_ratio``, ``decoder_layers`` ...).
    """
    preprocess = Preprocess(image_size=image_size, mean=tuple(mean), std=tuple(std))
    return MAE(config_from_dict(MAEConfig, {**fields, "image_size": image_size, "preprocess": preprocess}, "mae"))


@register_model("mae-vit-tiny")
def mae_vit_tiny(**overrides: Any) -> MAE:
    """32 px images, 4 px patches (64 patches), width 128, 4 layers; a 64-wide, 2-layer decoder."""
    sizes = dict(image_size=32, patch_size=4, width=128, layers=4, heads=4, decoder_width=64, decoder_layers=2,
                 decoder_heads=4)
    return mae(**{**sizes, **overrides})


@register_model("mae-vit-small")
def mae_vit_small(**overrides: Any) -> MAE:
    """ViT-S/16 (width 384, 12 layers, 6 heads) at 224 px, with a 256-wide, 4-layer decoder."""
    sizes = dict(patch_size=16, width=384, layers=12, heads=6, decoder_width=256, decoder_layers=4,
                 decoder_heads=8)
    return mae(**{**sizes, **overrides})


@register_model("mae-vit-base")
def mae_vit_base(**overrides: Any) -> MAE:
    """ViT-B/16 at 224 px with the paper's 512-wide, 8-layer decoder."""
    return mae(**overrides)


__all__ = ["mae", "mae_vit_tiny", "mae_vit_small", "mae_vit_base"]
