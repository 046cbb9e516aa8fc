"""Captioner named sizes: ``captioner-lite0-minilm`` (EfficientNet-Lite0 image tokens, a decoder started from
all-MiniLM-L6-v2; both pretrained and offline) and ``captioner-tiny`` (a small random ViT and decoder with the
word-level vocabulary of :func:`vlkit.data.text.build_word_tokenizer`: tests)."""

from __future__ import annotations

from typing import Any

from vlkit.models.captioner.model import Captioner, CaptionerConfig
from vlkit.models.io import config_from_dict
from vlkit.models.preprocess import CLIP_MEAN, CLIP_STD
from vlkit.models.registry import register_model


def captioner(**fields: Any) -> Captioner:
    """A Captioner from :class:`CaptionerConfig` fields (a nested ``preprocess`` as a dict is accepted)."""
    return Captioner(config_from_dict(CaptionerConfig, fields, "captioner"))


@register_model("captioner-lite0-minilm")
def captioner_lite0_minilm(**overrides: Any) -> Captioner:
    """EfficientNet-Lite0's 7x7 last feature map (frozen) -> the all-MiniLM-L6-v2-initialised decoder (trained
    whole); WordPiece ids: [CLS] 101 starts, [SEP] 102 ends, [PAD] 0."""
    return captioner(**overrides)


@register_model("captioner-tiny")
def captioner_tiny(**overrides: Any) -> Captioner:
    """For tests: ids 0-4 are [PAD], [UNK], [CLS], [SEP], [MASK] (as ``albef-tiny``); 32 px images."""
    sizes = dict(image_encoder="vit", image_size=32, patch_size=8, vision_width=64, vision_layers=2, vision_heads=2,
                 text_decoder=None, vocab_size=1000, decoder_width=64, decoder_layers=2, decoder_heads=2,
                 decoder_mlp_dim=128, max_positions=32, bos_token_id=2, eos_token_id=3, pad_token_id=0, dropout=0.0,
                 preprocess=dict(image_size=32, mean=CLIP_MEAN, std=CLIP_STD, context_length=32, tokenizer=None))
    return captioner(**{**sizes, **overrides})


__all__ = ["captioner", "captioner_lite0_minilm", "captioner_tiny"]
