"""ALBEF named sizes: ``albef-tiny`` (tests) and ``albef-base`` (ViT-B/16, 6 text + 6 fusion layers, BERT
vocabulary, 256-d contrastive space, queue 65536, momentum 0.995, alpha 0.4, as in the paper)."""

from __future__ import annotations

from typing import Any

from vlkit.models.albef.model import ALBEF, ALBEFConfig
from vlkit.models.io import config_from_dict
from vlkit.models.preprocess import CLIP_MEAN, CLIP_STD, Preprocess
from vlkit.models.registry import register_model


def albef(image_size: int = 256, context_length: int = 40, tokenizer: str | None = None,
          mean: tuple[float, float, float] = CLIP_MEAN, std: tuple[float, float, float] = CLIP_STD,
          **fields: Any) -> ALBEF:
    """An ALBEF of any size; the preprocessing follows ``image_size`` and ``context_length``.

    Args:
        image_size: input side in pixels.
        context_length: most text tokens.
        tokenizer: path of the tokenizer to preprocess text with (None: saved beside the model).
        mean, std: image normalisation.
        fields: further :class:`ALBEFConfig` fields.
    """
    preprocess = Preprocess(image_size=image_size, mean=tuple(mean), std=tuple(std), context_length=context_length,
                            tokenizer=tokenizer)
    return ALBEF(config_from_dict(ALBEFConfig, {**fields, "image_size": image_size, "context_length": context_length,
                                                "preprocess": preprocess}, "albef"))


@register_model("albef-tiny")
def albef_tiny(**overrides: Any) -> ALBEF:
    """For tests, with the word-level tokenizer of :func:`vlkit.data.text.build_word_tokenizer` (ids 0-4 are
    [PAD], [UNK], [CLS], [SEP], [MASK])."""
    sizes = dict(image_size=32, patch_size=8, vision_width=64, vision_layers=2, vision_heads=2, text_width=64,
                 text_layers=1, fusion_layers=1, text_heads=2, vocab_size=1000, mask_token_id=4, pad_token_id=0,
                 special_token_ids=(0, 2, 3, 4), context_length=32, embed_dim=32, queue_size=64)
    return albef(**{**sizes, **overrides})


@register_model("albef-base")
def albef_base(**overrides: Any) -> ALBEF:
    return albef(**overrides)


__all__ = ["albef", "albef_tiny", "albef_base"]
