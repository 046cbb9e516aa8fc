"""BEiT-style masked image modelling: a ViT predicting a VQ-VAE tokenizer's ids of masked patches."""

from vlkit.models.beit import builders  # noqa: F401  (registers the named sizes)
from vlkit.models.beit.model import BEiT, BEiTConfig, masked_token_loss

__all__ = ["BEiT", "BEiTConfig", "masked_token_loss"]
