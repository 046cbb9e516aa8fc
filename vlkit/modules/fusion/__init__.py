"""Fusion of image and text tokens: cross-attention encoders, a bidirectional text encoder, and the
pretraining objectives of fusion models (image-text matching, masked language modelling, momentum
distillation)."""

from vlkit.modules.fusion.cross_attention import FusionEncoder, FusionLayer
from vlkit.modules.fusion.distill import ITCOutput, distilled_cross_entropy, momentum_itc_loss, soft_cross_entropy
from vlkit.modules.fusion.itm import HardNegatives, ITMHead, ITMOutput, hard_negatives, itm_loss, random_negatives
from vlkit.modules.fusion.mlm import (
    MaskedTokens,
    MLMHead,
    MLMOutput,
    mask_tokens,
    mlm_loss,
    word_ids_from_encodings,
    word_ids_per_token,
)
from vlkit.modules.fusion.text_encoder import BidirectionalTextEncoder, TextEmbeddings

__all__ = [
    "BidirectionalTextEncoder",
    "FusionEncoder",
    "FusionLayer",
    "HardNegatives",
    "ITCOutput",
    "ITMHead",
    "ITMOutput",
    "MLMHead",
    "MLMOutput",
    "MaskedTokens",
    "TextEmbeddings",
    "distilled_cross_entropy",
    "hard_negatives",
    "itm_loss",
    "mask_tokens",
    "mlm_loss",
    "momentum_itc_loss",
    "random_negatives",
    "soft_cross_entropy",
    "word_ids_from_encodings",
    "word_ids_per_token",
]
