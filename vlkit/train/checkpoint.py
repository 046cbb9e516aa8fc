"""Checkpoints: everything needed to continue a run exactly, written atomically, checksummed, the last K and the
best kept.

Layout of a run directory::

    checkpoints/step-000120/state.pt       model, optimizer, scheduler, scaler, EMA, RNG states, data position
    checkpoints/step-000120/manifest.json  SHA-256 and size of every file of the checkpoint (written last)
    checkpoints/latest                     name of the newest complete checkpoint (replaced atomically)
    checkpoints/best/                      the best checkpoint by the chosen metric

``state.pt`` holds tensors and plain Python values only: it is read with ``torch.load(weights_only=True)``,
so a crafted file cannot run code. Its files are checked against the manifest before they are read; a
damaged ``latest`` checkpoint is skipped for the newest intact one when resuming with ``resume=latest``.
Files, folders and the ``latest`` pointer are fsync'ed before they are renamed into place.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from vlkit.errors import VlkitError
from vlkit.utils.fs import atomic_directory, atomic_write, remove_temporaries

STATE_NAME = "state.pt"
MANIFEST_NAME = "manifest.json"
STEP_PATTERN = re.compile(r"^step-\d{8}$")
_TEMPORARY_NAMES = r"step-\d{8}|best"


class DamagedCheckpoint(VlkitError):
    """A checkpoint whose files do not match its manifest (or cannot be read)."""


def rng_states() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) random states, as tensors and plain values only."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": {"bit_generator": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what :func:`rng_states` returned (or the NumPy tuple older checkpoints hold)."""
    random.setstate(states["python"])
    state = states["numpy"]
    if isinstance(state, dict):
        state = (state["bit_generator"], np.asarray(state["keys"], dtype=np.uint32), state["pos"],
                 state["has_gauss"], state["cached_gaussian"])
    np.random.set_state(state)
    torch.set_rng_state(states["torch"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class _HashingWriter:
    """A file for ``torch.save`` that hashes what it writes (torch writes its archive sequentially)."""

    def __init__(self, fh):
        self.fh, self.digest, self.size = fh, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.fh.write(data)

    def flush(self) -> None:
        self.fh.flush()


def write_manifest(directory: Path, known: dict[str, tuple[str, int]] | None = None) -> None:
    """Record the SHA-256 and size of every file in ``directory`` in ``manifest.json``.

    Args:
        known: ``{name: (sha256, bytes)}`` of files hashed while they were written (not read again).
    """
    known = known or {}
    files = {p.name: dict(zip(("sha256", "bytes"), known.get(p.name) or (_sha256(p), p.stat().st_size)))
             for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST_NAME}
    (directory / MANIFEST_NAME).write_text(json.dumps({"format": 1, "files": files}, indent=2) + "\n")


def verify_checkpoint(path: Path, contents: dict[str, bytes] | None = None) -> None:
    """Check every file of the checkpoint ``path`` against its manifest.

    A checkpoint written before manifests existed (no ``manifest.json``) is accepted unchecked.

    Args:
        contents: ``{name: bytes}`` of files the caller has already read (checked without reading them again).

    Raises:
        DamagedCheckpoint: a file is missing, of another size or another checksum, naming it.
    """
    contents = contents or {}
    manifest = path / MANIFEST_NAME
    if not manifest.exists():
        if not (path / STATE_NAME).is_file():
            raise DamagedCheckpoint(f"{path}: not a checkpoint (no {STATE_NAME})")
        return
    try:
        files = json.loads(manifest.read_text())["files"]
        items = [(str(name), str(entry["sha256"]), int(entry["bytes"])) for name, entry in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise DamagedCheckpoint(f"{path}: damaged checkpoint: {MANIFEST_NAME} is unreadable") from None
    if STATE_NAME not in files:
        raise DamagedCheckpoint(f"{path}: damaged checkpoint: {MANIFEST_NAME} does not list {STATE_NAME}")
    for name, sha, size in items:
        file = path / name
        if not file.is_file() or "/" in name:
            raise DamagedCheckpoint(f"{path}: damaged checkpoint: {name} is missing")
        data = contents.get(name)
        actual = (len(data), hashlib.sha256(data).hexdigest()) if data is not None else None
        if actual is None and file.stat().st_size == size:
            actual = (size, _sha256(file))
        if actual != (size, sha):
            raise DamagedCheckpoint(f"{path}: damaged checkpoint: {name} does not match its SHA-256 in "
                                    f"{MANIFEST_NAME} (the file was changed or corrupted)")


def remove_partial_checkpoints(run_dir: Path) -> list[Path]:
    """Delete the temporary folders an interrupted save left in ``run_dir/checkpoints`` (``.step-*.tmp-*``,
    ``.best.tmp-*`` and their ``.old-`` counterparts, by their exact names) and a torn ``latest`` pointer."""
    root = Path(run_dir) / "checkpoints"
    removed = remove_temporaries(root, _TEMPORARY_NAMES)
    pointer_tmp = root / ".latest.tmp"
    if pointer_tmp.is_file():
        pointer_tmp.unlink()
        removed.append(pointer_tmp)
    return removed


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], keep_last: int,
                    best: bool = False) -> Path:
    """Write ``state`` as ``checkpoints/step-<step>`` with its manifest (temporary folder, fsync, rename),
    point ``latest`` at it, copy it to ``best`` when asked, and delete all but the newest ``keep_last`` step
    checkpoints (never the one just written, which ``latest`` names)."""
    root = run_dir / "checkpoints"
    final = root / f"step-{step:08d}"
    with atomic_directory(final, "checkpoint", durable=True) as tmp:
        try:
            with open(tmp / STATE_NAME, "wb") as fh:
                writer = _HashingWriter(fh)
                torch.save(state, writer)
        except (RuntimeError, OSError) as exc:  # torch reports a failed write (full disk) as a RuntimeError
            raise VlkitError(f"{final}: cannot write the checkpoint ({str(exc).splitlines()[0]})") from None
        write_manifest(tmp, {STATE_NAME: (writer.digest.hexdigest(), writer.size)})
    atomic_write(root / "latest", final.name, durable=True)
    if best:
        with atomic_directory(root / "best", "checkpoint", durable=True) as tmp:
            for name in (STATE_NAME, MANIFEST_NAME):
                shutil.copy2(final / name, tmp / name)
    steps = sorted(p for p in root.iterdir() if STEP_PATTERN.match(p.name) and p.is_dir() and p != final)
    for old in steps[: max(0, len(steps) + 1 - max(1, keep_last))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _candidates(run_dir: Path) -> list[Path]:
    """Checkpoints of a run to resume from, best first: the one ``latest`` names, then the others newest first."""
    root = run_dir / "checkpoints"
    out = []
    pointer = root / "latest"
    if pointer.is_file():
        name = pointer.read_text().strip()
        if STEP_PATTERN.match(name):
            out.append(root / name)
    if root.is_dir():
        out += sorted((p for p in root.iterdir() if STEP_PATTERN.match(p.name) and p.is_dir() and p not in out),
                      reverse=True)
    return out


def _warn(message: str) -> None:
    print(f"vlkit: warning: {message}", file=sys.stderr)


def check_resume_target(resume: str, run_dir: Path) -> None:
    """Raise unless ``resume`` names a checkpoint of the run in ``run_dir`` (checked before any work or writing).

    Resuming continues the run that holds the checkpoint: its metrics are cut back to the checkpoint's step,
    its older checkpoints pruned, its ``best`` and ``model`` replaced. So ``latest`` needs a checkpoint in
    ``run_dir/checkpoints``, and a checkpoint folder must lie in ``run_dir/checkpoints`` itself: resuming a
    checkpoint of run A with ``output_dir`` B would rewrite B's files with A's run.

    Raises:
        VlkitError: no checkpoint in the run, or a checkpoint of another folder, saying what to do instead.
    """
    run_dir = Path(run_dir)
    if resume == "latest":
        if not _candidates(run_dir):
            raise VlkitError(f"resume=latest: no checkpoint in {run_dir}/checkpoints")
        return
    path = Path(resume)
    if path.resolve().parent != (run_dir / "checkpoints").resolve():
        raise VlkitError(f"resume={resume}: not a checkpoint of output_dir {run_dir} (it is not in "
                         f"{run_dir / 'checkpoints'}); resume continues the run that holds the checkpoint, so set "
                         "output_dir to that run's folder; to start a new run from trained weights, use "
                         "model.pretrained=RUN/model with a new output_dir")


def open_resume_checkpoint(resume: str, run_dir: Path,
                           warn: Callable[[str], None] = _warn) -> tuple[Path, dict[str, Any]]:
    """The checkpoint to resume from and its state.

    ``latest`` is the run's newest complete checkpoint; when it is damaged the newest intact one is used
    instead, and ``warn`` says so. Anything else is a checkpoint folder, which must be intact.

    Raises:
        VlkitError: no checkpoint, no intact checkpoint, a checkpoint of another folder (see
            :func:`check_resume_target`), or a damaged or unsafe explicit one.
    """
    check_resume_target(resume, run_dir)
    if resume != "latest":
        path = Path(resume)
        if not (path / STATE_NAME).exists():
            raise VlkitError(f"resume: {path} is not a checkpoint (no {STATE_NAME})")
        return path, load_checkpoint(path)
    candidates = _candidates(run_dir)
    if not candidates:
        raise VlkitError(f"resume=latest: no checkpoint in {run_dir}/checkpoints")
    problems = []
    for path in candidates:
        try:
            state = load_checkpoint(path)
        except DamagedCheckpoint as exc:
            problems.append(str(exc))
            continue
        if problems:
            warn(f"{problems[0]}; resuming from {path}, the newest intact checkpoint")
        return path, state
    raise VlkitError(f"resume=latest: no intact checkpoint in {run_dir}/checkpoints ({problems[0]})")


def newest_intact_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint ``latest`` names when it is intact, else the newest intact step checkpoint, or None."""
    for path in _candidates(Path(run_dir)):
        try:
            verify_checkpoint(path)
        except DamagedCheckpoint:
            continue
        return path
    return None


def _legacy_numpy_globals() -> list:
    """What the NumPy RNG state of checkpoints written before vlkit stored it as a tensor needs."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # NumPy 1.x
        from numpy.core.multiarray import _reconstruct
    found = [_reconstruct, np.ndarray, np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        found.append(dtypes.UInt32DType)
    return found


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Verify the checkpoint ``path`` against its manifest and read its state (tensors and plain values only).

    Raises:
        DamagedCheckpoint: a file does not match the manifest, or ``state.pt`` cannot be read.
        VlkitError: ``state.pt`` holds Python objects vlkit does not load (it could run code).
    """
    path = Path(path)
    try:
        data = (path / STATE_NAME).read_bytes()  # read once: checked against the manifest, then loaded
    except OSError as exc:
        raise DamagedCheckpoint(f"{path}: unreadable checkpoint ({exc.strerror or exc})") from None
    verify_checkpoint(path, {STATE_NAME: data})
    try:
        with torch.serialization.safe_globals(_legacy_numpy_globals()):
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        what = f" ({found.group(1)})" if found else ""
        raise VlkitError(f"{path / STATE_NAME}: refusing to load: it holds Python objects besides tensors{what}, "
                         "which could run code; vlkit loads only weights and plain values") from None
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise DamagedCheckpoint(f"{path}: unreadable checkpoint ({str(exc).splitlines()[0]})") from None
