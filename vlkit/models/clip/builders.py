"""CLIP named sizes: ``clip-tiny`` (tests), ``clip-vit-b-32``, ``clip-vit-b-16``, ``clip-vit-l-14``; with a Swin
image tower: ``clip-swin-micro`` (CPU) and ``clip-swin-tiny`` (Swin-T)."""

from __future__ import annotations

import dataclasses
from typing import Any

from vlkit.errors import VlkitError
from vlkit.models.clip.model import CLIP, CLIPConfig
from vlkit.models.io import config_from_dict
from vlkit.models.preprocess import Preprocess
from vlkit.models.registry import register_model
from vlkit.modules.encoders.swin import SWIN_SIZES, SwinConfig
from vlkit.modules.encoders.text_transformer import TextConfig
from vlkit.modules.encoders.vit import VisionConfig


def clip(
    embed_dim: int = 512,
    image_size: int = 224,
    patch_size: int = 32,
    vision_width: int = 768,
    vision_layers: int = 12,
    vision_heads: int = 12,
    text_width: int = 512,
    text_layers: int = 12,
    text_heads: int = 8,
    vocab_size: int = 49408,
    context_length: int = 77,
    act: str = "quick_gelu",
    eos_token_id: int | None = None,
    patch_dropout: float = 0.0,
    tokenizer: str | None = None,
    vision_qk_norm: bool = False,
    vision_parallel: bool = False,
    vision_bias: bool = True,
    **extra: Any,
) -> CLIP:
    """A CLIP of any size (the parameterised builder under the named sizes).

    Args:
        embed_dim: shared embedding width.
        image_size: input side in pixels.
        patch_size: ViT patch side.
        vision_width, vision_layers, vision_heads: the image tower.
        text_width, text_layers, text_heads: the text tower.
        vocab_size: tokenizer vocabulary size.
        context_length: maximum tokens.
        act: MLP activation of both towers (``quick_gelu`` for OpenAI weights).
        eos_token_id: token pooled by the text tower (None: the highest id, as in OpenAI CLIP).
        patch_dropout: FLIP patch dropout while training.
        tokenizer: path of the tokenizer to preprocess text with.
        vision_qk_norm, vision_parallel, vision_bias: the image tower's ViT-22B options (see
            :class:`~vlkit.modules.encoders.vit.VisionConfig`).
        extra: further :class:`CLIPConfig` fields (``init_temperature``, ``max_logit_scale``).
    """
    config = CLIPConfig(
        embed_dim=embed_dim,
        vision=VisionConfig(image_size=image_size, patch_size=patch_size, width=vision_width, layers=vision_layers,
                            heads=vision_heads, act=act, patch_dropout=patch_dropout, qk_norm=vision_qk_norm,
                            parallel=vision_parallel, bias=vision_bias),
        text=TextConfig(vocab_size=vocab_size, context_length=context_length, width=text_width, layers=text_layers,
                        heads=text_heads, act=act, eos_token_id=eos_token_id),
        preprocess=Preprocess(image_size=image_size, context_length=context_length, tokenizer=tokenizer),
        **extra,
    )
    return CLIP(config)


def clip_swin(
    embed_dim: int = 512,
    swin: str | SwinConfig | dict[str, Any] = "swin-tiny",
    image_size: int | None = None,
    text_width: int = 512,
    text_layers: int = 12,
    text_heads: int = 8,
    vocab_size: int = 49408,
    context_length: int = 77,
    act: str = "gelu",
    eos_token_id: int | None = None,
    tokenizer: str | None = None,
    **extra: Any,
) -> CLIP:
    """A CLIP whose image tower is a Swin Transformer (the mean of its last map, projected).

    Args:
        embed_dim: shared embedding width.
        swin: the image tower: a named size (``swin-tiny``, ``swin-micro``), a :class:`SwinConfig` or its fields.
        image_size: input side in pixels (default: the Swin size's ``image_size``).
        text_width, text_layers, text_heads, vocab_size, context_length, eos_token_id, tokenizer: the text
            tower, as in :func:`clip`.
        act: MLP activation of the text tower.
        extra: further :class:`CLIPConfig` fields.
    """
    if isinstance(swin, str):
        if swin not in SWIN_SIZES:
            raise VlkitError(f"unknown Swin size {swin!r}; available: {sorted(SWIN_SIZES)}")
        swin = SwinConfig(**SWIN_SIZES[swin])
    elif isinstance(swin, dict):
        swin = config_from_dict(SwinConfig, swin, "swin")
    if image_size is not None:
        swin = dataclasses.replace(swin, image_size=image_size)
    config = CLIPConfig(
        embed_dim=embed_dim,
        vision=VisionConfig(image_size=swin.image_size),
        swin=swin,
        text=TextConfig(vocab_size=vocab_size, context_length=context_length, width=text_width, layers=text_layers,
                        heads=text_heads, act=act, eos_token_id=eos_token_id),
        preprocess=Preprocess(image_size=swin.image_size, context_length=context_length, tokenizer=tokenizer),
        **extra,
    )
    return CLIP(config)


def _named(builder=None, **sizes: Any):
    def build(**overrides: Any) -> CLIP:
        return (builder or clip)(**{**sizes, **overrides})

    return build


clip_tiny = register_model("clip-tiny")(_named(
    embed_dim=32, image_size=32, patch_size=8, vision_width=64, vision_layers=2, vision_heads=2, text_width=64,
    text_layers=2, text_heads=2, vocab_size=1000, context_length=32, act="gelu"))
clip_vit_b32 = register_model("clip-vit-b-32")(_named(patch_size=32))
clip_vit_b16 = register_model("clip-vit-b-16")(_named(patch_size=16))
clip_vit_l14 = register_model("clip-vit-l-14")(_named(
    embed_dim=768, patch_size=14, vision_width=1024, vision_layers=24, vision_heads=16, text_width=768,
    text_layers=12, text_heads=12))
clip_swin_micro = register_model("clip-swin-micro")(_named(
    clip_swin, embed_dim=32, swin="swin-micro", text_width=64, text_layers=2, text_heads=2, vocab_size=1000,
    context_length=32))
clip_swin_tiny = register_model("clip-swin-tiny")(_named(clip_swin, swin="swin-tiny"))

__all__ = ["clip", "clip_swin", "clip_tiny", "clip_vit_b32", "clip_vit_b16", "clip_vit_l14", "clip_swin_micro",
           "clip_swin_tiny"]
