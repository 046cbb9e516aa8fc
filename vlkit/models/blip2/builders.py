"""BLIP-2 named sizes: ``blip2-tiny`` (tests: a tiny random ViT at 32 px, a 2-layer Q-Former of width 64 with 8
queries, the word-level vocabulary of :func:`vlkit.data.text.build_word_tokenizer`), ``blip2-lite0-minilm`` (the
CPU towers: frozen pretrained EfficientNet-Lite0 grid tokens, a Q-Former started from all-MiniLM-L6-v2 with 32
queries and its WordPiece tokenizer) and ``blip2-base`` (the paper's shape: ViT-B/16 at 224 frozen, a BERT-base
Q-Former, 32 queries; give ``qformer_init`` a local BERT-base directory to start from its weights).

Stage 2: ``create_model(name, pretrained=STAGE1_DIR, stage=2, language_model=...)``."""

from __future__ import annotations

from typing import Any

from vlkit.models.blip2.config import BLIP2Config
from vlkit.models.blip2.model import BLIP2
from vlkit.models.io import config_from_dict
from vlkit.models.preprocess import CLIP_MEAN, CLIP_STD, Preprocess
from vlkit.models.registry import register_model


def blip2(image_size: int = 224, context_length: int = 32, tokenizer: str | None = None,
          mean: tuple[float, float, float] = CLIP_MEAN, std: tuple[float, float, float] = CLIP_STD,
          **fields: Any) -> BLIP2:
    """A BLIP-2 of any size; the preprocessing follows ``image_size`` and ``context_length``.

    Args:
        image_size: input side in pixels.
        context_length: most text tokens.
        tokenizer: path of the tokenizer to preprocess text with (None: the Q-Former's BERT's, or saved beside
            the model).
        mean, std: image normalisation.
        fields: further :class:`BLIP2Config` fields.
    """
    preprocess = Preprocess(image_size=image_size, mean=tuple(mean), std=tuple(std), context_length=context_length,
                            tokenizer=tokenizer)
    return BLIP2(config_from_dict(BLIP2Config, {**fields, "image_size": image_size, "context_length": context_length,
                                                "preprocess": preprocess}, "blip2"))


@register_model("blip2-tiny")
def blip2_tiny(**overrides: Any) -> BLIP2:
    """For tests: ids 0-4 are [PAD], [UNK], [CLS], [SEP], [MASK] (as ``albef-tiny``); 32 px images; stage 2's
    ``language_model="bert"`` is a random 2-layer decoder of width 64 over the same vocabulary."""
    sizes = dict(image_encoder="vit", image_size=32, patch_size=8, vision_width=64, vision_layers=2, vision_heads=2,
                 num_queries=8, vocab_size=1000, width=64, layers=2, heads=2, mlp_dim=128, context_length=32,
                 pad_token_id=0, bos_token_id=2, eos_token_id=3, embed_dim=32, decoder_width=64, decoder_layers=2,
                 decoder_heads=2, decoder_mlp_dim=128, max_positions=32)
    return blip2(**{**sizes, **overrides})


@register_model("blip2-lite0-minilm")
def blip2_lite0_minilm(**overrides: Any) -> BLIP2:
    """EfficientNet-Lite0's 7x7 last feature map (frozen) read by 32 queries of a Q-Former started from
    all-MiniLM-L6-v2 (6 layers, width 384); WordPiece ids: [CLS] 101 starts, [SEP] 102 ends, [PAD] 0. Stage 2's
    ``language_model="minilm"`` is a BERT decoder started from the same checkpoint (frozen but its new
    cross-attention and head)."""
    sizes = dict(image_encoder="efficientnet_lite0", image_size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                 qformer_init="minilm", num_queries=32, context_length=32, embed_dim=256, max_positions=32,
                 pad_token_id=0, bos_token_id=101, eos_token_id=102)
    return blip2(**{**sizes, **overrides})


@register_model("blip2-base")
def blip2_base(**overrides: Any) -> BLIP2:
    """ViT-B/16 at 224 px (frozen), a BERT-base-sized Q-Former with 32 queries, cross-attention every other
    layer, 256-d contrastive space (BLIP-2's stage-1 shape)."""
    return blip2(**overrides)


__all__ = ["blip2", "blip2_tiny", "blip2_lite0_minilm", "blip2_base"]
