"""VLMo named sizes: ``vlmo-tiny`` (tests) and ``vlmo-base`` (ViT-B/16 at 224 px: width 768, 12 layers, 12
heads, the top 2 layers vision-language, BERT vocabulary, 40 text tokens, as in the paper)."""

from __future__ import annotations

from typing import Any

from vlkit.models.io import config_from_dict
from vlkit.models.preprocess import Preprocess
from vlkit.models.registry import register_model
from vlkit.models.vlmo.model import VLMo, VLMoConfig


def vlmo(image_size: int = 224, context_length: int = 40, tokenizer: str | None = None,
         mean: tuple[float, float, float] = (0.5, 0.5, 0.5), std: tuple[float, float, float] = (0.5, 0.5, 0.5),
         **fields: Any) -> VLMo:
    """A VLMo of any size; the preprocessing follows ``image_size`` and ``context_length``.

    Args:
        image_size: input side in pixels.
        context_length: most text tokens.
        tokenizer: path of the tokenizer to preprocess text with (None: saved beside the model).
        mean, std: image normalisation.
        fields: further :class:`VLMoConfig` fields (``stage``, ``fusion_layers``, ...).
    """
    preprocess = Preprocess(image_size=image_size, mean=tuple(mean), std=tuple(std), context_length=context_length,
                            tokenizer=tokenizer)
    return VLMo(config_from_dict(VLMoConfig, {**fields, "image_size": image_size, "context_length": context_length,
                                              "preprocess": preprocess}, "vlmo"))


@register_model("vlmo-tiny")
def vlmo_tiny(**overrides: Any) -> VLMo:
    """For tests, with the word-level tokenizer of :func:`vlkit.data.text.build_word_tokenizer` (ids 0-4 are
    [PAD], [UNK], [CLS], [SEP], [MASK]); 32-px images, 2 layers of which the top one is vision-language."""
    sizes = dict(image_size=32, patch_size=8, width=64, layers=2, heads=2, fusion_layers=1, vocab_size=1000,
                 mask_token_id=4, pad_token_id=0, special_token_ids=(0, 2, 3, 4), context_length=32, embed_dim=32)
    return vlmo(**{**sizes, **overrides})


@register_model("vlmo-base")
def vlmo_base(**overrides: Any) -> VLMo:
    return vlmo(**overrides)


__all__ = ["vlmo", "vlmo_tiny", "vlmo_base"]
