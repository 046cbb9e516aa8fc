"""The ALBEF family: align (contrastive, with momentum distillation) before fuse (cross-attention, ITM, MLM)."""

from vlkit.models.albef import builders  # noqa: F401  (registers the named sizes)
from vlkit.models.albef.model import ALBEF, ALBEFConfig, ALBEFOutput

__all__ = ["ALBEF", "ALBEFConfig", "ALBEFOutput"]
