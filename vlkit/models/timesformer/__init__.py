"""The TimeSformer family: video classification with divided, joint or space-only attention."""

from vlkit.models.timesformer import builders  # noqa: F401  (registers the named sizes)
from vlkit.models.timesformer.model import TimeSformer, TimeSformerConfig

__all__ = ["TimeSformer", "TimeSformerConfig"]
