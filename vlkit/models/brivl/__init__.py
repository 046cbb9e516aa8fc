"""BriVL-style two-tower models: CNN + MSPP + self-attention, pretrained text encoder + self-attention."""

from vlkit.models.brivl import builders  # noqa: F401  (registers the named sizes)
from vlkit.models.brivl.model import BriVL, BriVLConfig

__all__ = ["BriVL", "BriVLConfig"]
