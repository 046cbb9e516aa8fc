"""BLIP-style captioners: image tokens from a CNN or a ViT, a BERT-shaped decoder cross-attending to them."""

from vlkit.models.captioner import builders  # noqa: F401  (registers the named sizes)
from vlkit.models.captioner.model import Captioner, CaptionerConfig

__all__ = ["Captioner", "CaptionerConfig"]
