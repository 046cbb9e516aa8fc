"""ViLT named sizes: ``vilt-tiny`` (tests) and ``vilt-base`` (ViT-B/32 sizes: width 768, 12 layers, 12 heads,
BERT vocabulary, 40 text tokens, images of 384 px)."""

from __future__ import annotations

from typing import Any

from vlkit.models.io import config_from_dict
from vlkit.models.preprocess import Preprocess
from vlkit.models.registry import register_model
from vlkit.models.vilt.model import ViLT, ViLTConfig


def vilt(image_size: int = 384, context_length: int = 40, tokenizer: str | None = None,
         mean: tuple[float, float, float] = (0.5, 0.5, 0.5), std: tuple[float, float, float] = (0.5, 0.5, 0.5),
         **fields: Any) -> ViLT:
    """A ViLT of any size; the preprocessing follows ``image_size`` and ``context_length``.

    Args:
        image_size: input side in pixels.
        context_length: most text tokens.
        tokenizer: path of the tokenizer to preprocess text with (None: saved beside the model).
        mean, std: image normalisation.
        fields: further :class:`ViLTConfig` fields.
    """
    preprocess = Preprocess(image_size=image_size, mean=tuple(mean), std=tuple(std), context_length=context_length,
                            tokenizer=tokenizer)
    return ViLT(config_from_dict(ViLTConfig, {**fields, "image_size": image_size, "context_length": context_length,
                                              "preprocess": preprocess}, "vilt"))


@register_model("vilt-tiny")
def vilt_tiny(**overrides: Any) -> ViLT:
    """For tests, with the word-level tokenizer of :func:`vlkit.data.text.build_word_tokenizer` (ids 0-4 are
    [PAD], [UNK], [CLS], [SEP], [MASK])."""
    sizes = dict(image_size=32, patch_size=8, width=64, layers=2, heads=2, vocab_size=1000, mask_token_id=4,
                 pad_token_id=0, special_token_ids=(0, 2, 3, 4), context_length=32)
    return vilt(**{**sizes, **overrides})


@register_model("vilt-base")
def vilt_base(**overrides: Any) -> ViLT:
    return vilt(**overrides)


__all__ = ["vilt", "vilt_tiny", "vilt_base"]
