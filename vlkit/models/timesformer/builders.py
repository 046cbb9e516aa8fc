"""TimeSformer named sizes: ``timesformer-tiny`` (tests, CPU), ``timesformer-small``, ``timesformer-base``
(the paper's ViT-B/16 at 224 px, 8 frames)."""

from __future__ import annotations

from typing import Any

from vlkit.models.io import config_from_dict
from vlkit.models.preprocess import Preprocess
from vlkit.models.registry import register_model
from vlkit.models.timesformer.model import VIDEO_MEAN, VIDEO_STD, TimeSformer, TimeSformerConfig


def timesformer(image_size: int = 224, mean: tuple[float, float, float] = VIDEO_MEAN,
                std: tuple[float, float, float] = VIDEO_STD, **fields: Any) -> TimeSformer:
    """A TimeSformer of any size; the preprocessing follows ``image_size``.

    Args:
        image_size: frame side in pixels.
        mean, std: frame normalisation.
        fields: further :class:`TimeSformerConfig` fields (``frames``, ``attention``, ``num_classes`` ...).
    """
    preprocess = Preprocess(image_size=image_size, mean=tuple(mean), std=tuple(std))
    return TimeSformer(config_from_dict(TimeSformerConfig, {**fields, "image_size": image_size,
                                                            "preprocess": preprocess}, "timesformer"))


@register_model("timesformer-tiny")
def timesformer_tiny(**overrides: Any) -> TimeSformer:
    """32 px frames, 8 px patches (16 per frame), 8 frames, width 64, 2 layers, 2 heads."""
    sizes = dict(image_size=32, patch_size=8, frames=8, width=64, layers=2, heads=2, num_classes=8)
    return timesformer(**{**sizes, **overrides})


@register_model("timesformer-small")
def timesformer_small(**overrides: Any) -> TimeSformer:
    """ViT-S/16 sizes (width 384, 12 layers, 6 heads) at 224 px, 8 frames."""
    return timesformer(**{**dict(patch_size=16, width=384, layers=12, heads=6), **overrides})


@register_model("timesformer-base")
def timesformer_base(**overrides: Any) -> TimeSformer:
    """ViT-B/16 at 224 px, 8 frames, divided attention (the paper's TimeSformer)."""
    return timesformer(**overrides)


__all__ = ["timesformer", "timesformer_tiny", "timesformer_small", "timesformer_base"]
