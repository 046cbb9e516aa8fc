"""CoCa named sizes: ``coca-tiny`` (tests and synthetic data) and ``coca-vit-b-32`` (open_clip's
``coca_ViT-B-32``)."""

from __future__ import annotations

from typing import Any

from vlkit.models.coca.model import CoCa, CoCaConfig
from vlkit.models.io import config_from_dict
from vlkit.models.preprocess import CLIP_MEAN, CLIP_STD, Preprocess
from vlkit.models.registry import register_model


def coca(image_size: int = 224, context_length: int = 76, tokenizer: str | None = None,
         mean: tuple[float, float, float] = CLIP_MEAN, std: tuple[float, float, float] = CLIP_STD,
         **fields: Any) -> CoCa:
    """A CoCa of any size (the parameterised builder under the named sizes); the preprocessing follows
    ``image_size`` and ``context_length``.

    Args:
        image_size: input side in pixels.
        context_length: most text tokens.
        tokenizer: path of the tokenizer to preprocess text with (None: saved beside the model).
        mean, std: image normalisation.
        fields: further :class:`CoCaConfig` fields (``embed_dim``, ``vision_width``, ``num_queries``,
            ``contrastive_pooler``, ``bos_token_id``, ...).
    """
    preprocess = Preprocess(image_size=image_size, mean=tuple(mean), std=tuple(std), context_length=context_length,
                            tokenizer=tokenizer)
    return CoCa(config_from_dict(CoCaConfig, {**fields, "image_size": image_size, "context_length": context_length,
                                              "preprocess": preprocess}, "coca"))


@register_model("coca-tiny")
def coca_tiny(**overrides: Any) -> CoCa:
    """For tests, with the word-level tokenizer of :func:`vlkit.data.text.build_word_tokenizer` (ids 0-4 are
    [PAD], [UNK], [CLS], [SEP], [MASK]; a caption is [CLS] ... [SEP])."""
    sizes = dict(image_size=32, patch_size=8, embed_dim=64, vision_width=64, vision_layers=2, vision_heads=2,
                 text_width=64, text_layers=2, text_heads=2, decoder_width=64, decoder_layers=2, decoder_heads=2,
                 num_queries=16, pooler_heads=2, vocab_size=1000, context_length=32, bos_token_id=2, eos_token_id=3,
                 pad_token_id=0)
    return coca(**{**sizes, **overrides})


@register_model("coca-vit-b-32")
def coca_vit_b32(**overrides: Any) -> CoCa:
    """open_clip's ``coca_ViT-B-32``: ViT-B/32 (12 heads), 12 text and 12 decoder layers of width 512, 256 pooler
    queries, CLIP's BPE (start 49406, end 49407, padding 0), 76 text tokens, GELU, and the [CLS] mask its
    released weights were trained with (``legacy_cls_mask``)."""
    return coca(**{"legacy_cls_mask": True, **overrides})


__all__ = ["coca", "coca_tiny", "coca_vit_b32"]
