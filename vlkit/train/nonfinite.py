"""What the trainer does with a non-finite loss or gradient norm: stop with an error that says where the run
stands (``nonfinite: stop``, the default), or drop that step's update and count it (``nonfinite: skip``).

Either way the optimizer never applies a non-finite step: the check runs after the backward pass and before
the update.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from vlkit.errors import VlkitError
from vlkit.train.checkpoint import newest_intact_checkpoint


def non_finite(named: dict[str, float]) -> list[str]:
    """``"<what> is nan"`` for each value of ``named`` (``{what: value}``) that is not a finite number."""
    return [f"{what} is {value}" for what, value in named.items() if not math.isfinite(value)]


def nonfinite_error(step: int, problems: Sequence[str], run_dir: Path) -> VlkitError:
    """The error that stops a run at ``step``: what was not finite, and the checkpoint to go back to."""
    good = newest_intact_checkpoint(run_dir)
    where = f"last good checkpoint: {good if good is not None else 'none yet'}"
    return VlkitError(f"step {step}: {'; '.join(problems)}; training stopped before applying this step ({where}). "
                      f"Lower the learning rates or raise optim.eps, or set nonfinite=skip to drop such steps")
