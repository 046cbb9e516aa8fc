"""CLIP named sizes: ``clip-tiny`` (tests), ``clip-vit-b-32``, ``clip-vit-b-16``, ``clip-vit-l-14``."""

from __future__ import annotations

from typing import Any

from vlkit.models.clip.model import CLIP, CLIPConfig
from vlkit.models.preprocess import Preprocess
from vlkit.models.registry import register_model
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
        extra: further :class:`CLIPConfig` fields (``init_temperature``, ``max_logit_scale``).
    """
    config = CLIPConfig(
        embed_dim=embed_dim,
        vision=VisionConfig(image_size=image_size, patch_size=patch_size, width=vision_width, layers=vision_layers,
                            heads=vision_heads, act=act, patch_dropout=patch_dropout),
        text=TextConfig(vocab_size=vocab_size, context_length=context_length, width=text_width, layers=text_layers,
                        heads=text_heads, act=act, eos_token_id=eos_token_id),
        preprocess=Preprocess(image_size=image_size, context_length=context_length, tokenizer=tokenizer),
        **extra,
    )
    return CLIP(config)


def _named(**sizes: Any):
    def build(**overrides: Any) -> CLIP:
        return clip(**{**sizes, **overrides})

    return build


clip_tiny = register_model("clip-tiny")(_named(
    embed_dim=32, image_size=32, patch_size=8, vision_width=64, vision_layers=2, vision_heads=2, text_width=64,
    text_layers=2, text_heads=2, vocab_size=1000, context_length=32, act="gelu"))
clip_vit_b32 = register_model("clip-vit-b-32")(_named(patch_size=32))
clip_vit_b16 = register_model("clip-vit-b-16")(_named(patch_size=16))
clip_vit_l14 = register_model("clip-vit-l-14")(_named(
    embed_dim=768, patch_size=14, vision_width=1024, vision_layers=24, vision_heads=16, text_width=768,
    text_layers=12, text_heads=12))

__all__ = ["clip", "clip_tiny", "clip_vit_b32", "clip_vit_b16", "clip_vit_l14"]
