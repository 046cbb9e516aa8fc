"""Checkpoints: everything needed to continue a run exactly, written atomically, the last K and the best kept.

Layout of a run directory::

    checkpoints/step-000120/state.pt    model, optimizer, scheduler, scaler, EMA, RNG states, data position
    checkpoints/latest                  name of the newest complete checkpoint (replaced atomically)
    checkpoints/best/                   the best checkpoint by the chosen metric
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlkit.errors import VlkitError
from vlkit.utils.fs import atomic_directory

STATE_NAME = "state.pt"


def rng_states() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], keep_last: int,
                    best: bool = False) -> Path:
    """Write ``state`` as ``checkpoints/step-<step>`` (temporary directory, then rename), point ``latest`` at it,
    copy it to ``best`` when asked, and delete all but the newest ``keep_last`` step checkpoints."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    with atomic_directory(final) as tmp:
        torch.save(state, tmp / STATE_NAME)
    _atomic_write_text(root / "latest", final.name)
    if best:
        with atomic_directory(root / "best") as tmp:
            shutil.copy2(final / STATE_NAME, tmp / STATE_NAME)
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in steps[: max(0, len(steps) - max(1, keep_last))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def resolve_checkpoint(resume: str, run_dir: Path) -> Path:
    """``latest`` (the run directory's newest complete checkpoint) or a checkpoint directory."""
    if resume == "latest":
        pointer = run_dir / "checkpoints" / "latest"
        if not pointer.exists():
            raise VlkitError(f"resume=latest: no checkpoint in {run_dir}/checkpoints")
        path = run_dir / "checkpoints" / pointer.read_text().strip()
    else:
        path = Path(resume)
    if not (path / STATE_NAME).exists():
        raise VlkitError(f"resume: {path} is not a checkpoint (no {STATE_NAME})")
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path / STATE_NAME, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as exc:
        raise VlkitError(f"{path}: unreadable checkpoint ({exc})") from None
