"""The CoCa family: model, named sizes, and the converter for open_clip CoCa checkpoints."""

from vlkit.models.coca import builders  # noqa: F401  (registers the named sizes)
from vlkit.models.coca.model import CoCa, CoCaConfig, CoCaOutput

__all__ = ["CoCa", "CoCaConfig", "CoCaOutput"]
