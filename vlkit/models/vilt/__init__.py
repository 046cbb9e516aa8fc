"""The ViLT family: one transformer over text tokens and image patches, with ITM, MLM and VQA heads."""

from vlkit.models.vilt import builders  # noqa: F401  (registers the named sizes)
from vlkit.models.vilt.model import ViLT, ViLTConfig, ViLTOutput

__all__ = ["ViLT", "ViLTConfig", "ViLTOutput"]
