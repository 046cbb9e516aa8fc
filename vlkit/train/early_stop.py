"""Early stopping: end a run when a validation metric has not improved for ``patience`` evaluations in a row.

The count and the best value travel with the checkpoint, so a resumed run stops where the uninterrupted one
would have, and a run that stopped early stays stopped when resumed.
"""

from __future__ import annotations

from typing import Any, Optional

from vlkit.config.schema import EarlyStopConfig
from vlkit.errors import VlkitError


class EarlyStopping:
    """Watches one metric over the evaluations of a run.

    Args:
        cfg: the ``early_stop`` config (metric, patience, mode, min_delta).

    Example:
        >>> stop = EarlyStopping(EarlyStopConfig(metric="val/d/rsum", patience=2))
        >>> [stop.update({"val/d/rsum": v}, step) for step, v in enumerate([1.0, 2.0, 1.5, 1.9])]
        [False, False, False, True]
    """

    def __init__(self, cfg: EarlyStopConfig):
        self.cfg = cfg
        self.best: Optional[float] = None
        self.best_step: Optional[int] = None
        self.bad_evals = 0
        self.stopped = False

    def improved(self, value: float) -> bool:
        """Whether ``value`` beats the best so far by more than ``min_delta`` (in the direction of ``mode``)."""
        if self.best is None:
            return True
        if self.cfg.mode == "min":
            return value < self.best - self.cfg.min_delta
        return value > self.best + self.cfg.min_delta

    def update(self, metrics: dict[str, float], step: int) -> bool:
        """Count one evaluation; True when the run must stop now.

        Raises:
            VlkitError: the evaluation has no such metric (naming those it has).
        """
        key = self.cfg.metric
        if key not in metrics:
            have = ", ".join(sorted(metrics)) or "none: the tasks have no validation split"
            raise VlkitError(f"early_stop.metric: the evaluation gave no {key!r} (it gave {have})")
        value = float(metrics[key])
        if self.improved(value):
            self.best, self.best_step, self.bad_evals = value, step, 0
        else:
            self.bad_evals += 1
        self.stopped = self.bad_evals >= self.cfg.patience
        return self.stopped

    def message(self, step: int) -> str:
        """Why the run stopped, for the user."""
        return (f"early stop at step {step}: {self.cfg.metric} has not improved on {self.best:.6g} (step "
                f"{self.best_step}) for {self.bad_evals} evaluations (patience {self.cfg.patience})")

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "bad_evals": self.bad_evals, "stopped": self.stopped}

    def load_state_dict(self, state: Optional[dict[str, Any]]) -> None:
        """Restore from :meth:`state_dict` (None: a checkpoint of a run without early stopping: start afresh)."""
        if not state:
            return
        self.best, self.best_step = state["best"], state["best_step"]
        self.bad_evals, self.stopped = int(state["bad_evals"]), bool(state["stopped"])
