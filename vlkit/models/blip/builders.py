"""BLIP named sizes: ``blip-tiny`` (tests and synthetic data) and ``blip-base`` (ViT-B/16 at 224 px, a 12-layer
BERT-base-sized text transformer, BERT vocabulary, 256-d contrastive space, queue 57600, momentum 0.995,
alpha 0.4, as in the paper)."""

from __future__ import annotations

from typing import Any

from vlkit.models.blip.model import BLIP, BLIPConfig
from vlkit.models.io import config_from_dict
from vlkit.models.preprocess import CLIP_MEAN, CLIP_STD, Preprocess
from vlkit.models.registry import register_model
from vlkit.modules.encoders.hf_text import MINILM


def blip(image_size: int = 224, context_length: int = 40, tokenizer: str | None = None,
         mean: tuple[float, float, float] = CLIP_MEAN, std: tuple[float, float, float] = CLIP_STD,
         **fields: Any) -> BLIP:
    """A BLIP of any size; the preprocessing follows ``image_size`` and ``context_length``.

    Args:
        image_size: input side in pixels.
        context_length: most text tokens.
        tokenizer: path (or ``minilm``) of the tokenizer to preprocess text with (None: saved beside the model).
        mean, std: image normalisation.
        fields: further :class:`BLIPConfig` fields.
    """
    preprocess = Preprocess(image_size=image_size, mean=tuple(mean), std=tuple(std), context_length=context_length,
                            tokenizer=tokenizer)
    return BLIP(config_from_dict(BLIPConfig, {**fields, "image_size": image_size, "context_length": context_length,
                                              "preprocess": preprocess}, "blip"))


@register_model("blip-tiny")
def blip_tiny(**overrides: Any) -> BLIP:
    """For tests, with the word-level tokenizer of :func:`vlkit.data.text.build_word_tokenizer` (ids 0-4 are
    [PAD], [UNK], [CLS], [SEP], [MASK]; a caption is [CLS] ... [SEP]): a 2-layer ViT on 32 px images and a
    2-layer text transformer of width 64."""
    sizes = dict(image_size=32, patch_size=8, vision_width=64, vision_layers=2, vision_heads=2, text_width=64,
                 text_layers=2, text_heads=2, vocab_size=1000, pad_token_id=0, bos_token_id=2, eos_token_id=3,
                 context_length=32, embed_dim=32, queue_size=64)
    return blip(**{**sizes, **overrides})


@register_model("blip-base")
def blip_base(**overrides: Any) -> BLIP:
    """BLIP-base: ViT-B/16 at 224 px and a BERT-base-sized text transformer (12 layers, width 768, 12 heads) over
    BERT's uncased WordPiece vocabulary ([CLS] 101 starts, [SEP] 102 ends, [PAD] 0); texts go through the
    all-MiniLM-L6-v2 package's tokenizer (the same vocabulary) unless another vocabulary is given."""
    if "vocab_size" not in overrides:
        overrides.setdefault("tokenizer", MINILM)
    return blip(**overrides)


__all__ = ["blip", "blip_tiny", "blip_base"]
