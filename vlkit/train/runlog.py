"""What a run writes for people: metrics.jsonl, TensorBoard scalars, the resolved config and environment.

A new run starts only in a folder that holds no run: two runs never mix their metrics, config and checkpoints.
``metrics.jsonl`` is read by :func:`read_metrics`, which skips a torn last line (a crash mid-write).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from vlkit.errors import VlkitError
from vlkit.utils.fs import MARKER_NAME, atomic_write, output_kind

METRICS_NAME = "metrics.jsonl"
# what a run writes at the top of its folder
RUN_FILES = (MARKER_NAME, "config.yaml", METRICS_NAME, "environment.json", "tokenizer.json", "model", "model_ema",
             "checkpoints", "tensorboard", "curves.png")


def check_new_run_dir(run_dir: str | Path) -> None:
    """Raise unless a new run may start in ``run_dir``: absent, or a folder holding none of a run's files.

    Raises:
        VlkitError: the folder holds an earlier run (continue it with ``resume=latest``) or files a new run
            would overwrite, or is a file.
    """
    run_dir = Path(run_dir)
    if not os.path.lexists(run_dir):
        for parent in run_dir.parents:
            if os.path.lexists(parent):
                if not parent.is_dir():
                    raise VlkitError(f"output_dir {run_dir}: cannot create it ({parent} is not a directory)")
                break
        return
    if not run_dir.is_dir():
        raise VlkitError(f"output_dir {run_dir}: exists and is not a directory")
    if output_kind(run_dir) == "run" or (run_dir / "checkpoints").is_dir():
        how = ("continue it with resume=latest" if (run_dir / "checkpoints" / "latest").exists()
               else "it has no checkpoint to resume from")
        raise VlkitError(f"output_dir {run_dir}: holds an earlier run ({how}); a new run needs a new output_dir, "
                         "it never replaces or mixes with an old one")
    clash = [name for name in RUN_FILES if os.path.lexists(run_dir / name)]
    if clash:
        raise VlkitError(f"output_dir {run_dir}: holds {', '.join(clash)}, which a new run would overwrite; "
                         "choose a new output_dir")


def read_metrics(path: str | Path, on_torn: Any = None) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl``, skipping lines that are not complete JSON objects with a step
    (a torn last line left by a crash mid-write).

    Args:
        path: the file (or a run directory holding ``metrics.jsonl``).
        on_torn: called with ``(line_number, text)`` for each skipped line.

    Returns:
        One dict per complete line, in file order.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_NAME
    rows = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                ok = isinstance(row, dict) and isinstance(row.get("step"), int)
            except ValueError:
                ok = False
            if ok:
                rows.append(row)
            elif on_torn is not None:
                on_torn(number, line.rstrip("\n"))
    return rows


def environment() -> dict[str, Any]:
    """Python, package versions and the git commit of the working tree (if any)."""
    from importlib import metadata

    versions = {}
    for name in ("vlkit", "torch", "pylance", "pyarrow", "transformers", "tokenizers", "numpy", "Pillow"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    commit = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"python": sys.version.split()[0], "platform": platform.platform(), "packages": versions,
            "git_commit": commit, "argv": sys.argv}


class RunLog:
    """Appends metrics to ``metrics.jsonl`` and TensorBoard; only rank 0 makes one."""

    def __init__(self, run_dir: Path, tensorboard: bool = True):
        self.path = run_dir / "metrics.jsonl"
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                self.writer = None

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after ``step`` (a resumed run logs them again) and torn lines, saying so."""
        if not self.path.exists():
            return

        def torn(number: int, text: str) -> None:
            print(f"vlkit: warning: {self.path}:{number}: dropped an incomplete line (a crash mid-write): "
                  f"{text[:60]!r}", file=sys.stderr)

        keep = [row for row in read_metrics(self.path, on_torn=torn) if row["step"] <= step]
        atomic_write(self.path, "".join(json.dumps(row) + "\n" for row in keep))

    def log(self, step: int, values: dict[str, float]) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"step": step, **values}) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
