"""Output paths: folders that appear whole or not at all, and that replace only vlkit's own earlier output.

Every command that writes a folder goes through :func:`atomic_directory`: the folder is filled in a temporary
folder beside it and renamed into place, with a marker file (``.vlkit-output.json``, holding the kind of
output: ``index``, ``run``, ``report``, ``model``, ...) written inside it. An existing folder is replaced only
when it is empty or an earlier vlkit output of the same kind (the marker, or the files such an output held
before markers existed); never the current directory, ``/``, the home folder, an input of the command or a
folder that holds one. Problems (a regular file in the way, a folder that cannot be created, a read-only or
full disk) are :class:`~vlkit.errors.VlkitError` naming the path and the reason, and leave nothing behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

from vlkit.errors import VlkitError

MARKER_NAME = ".vlkit-output.json"
REPORT_GENERATOR = '<meta name="generator" content="vlkit eval">'

# what a person calls each kind of output, in messages
KIND_NAMES = {"index": "vlkit index", "report": "vlkit eval report", "run": "vlkit training run",
              "model": "vlkit model folder", "checkpoint": "vlkit checkpoint", "quickstart": "vlkit quickstart folder",
              "synth": "vlkit synthetic dataset", "export": "vlkit export"}

# kinds whose own files identify them and whose folders are handed to other tools (transformers): no marker
UNMARKED_KINDS = {"model"}

# disk problems reported as one line instead of a traceback
_DISK_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT}


def _head(path: Path, n: int = 2000) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read(n)
    except OSError:
        return ""


def _json(path: Path) -> dict:
    """The JSON object in ``path`` (a small file), or an empty dict when it is absent, unreadable or not one."""
    try:
        if path.stat().st_size > 1 << 20:
            return {}
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _is_model(d: Path) -> bool:
    """A model folder vlkit wrote: ``model.safetensors`` and a ``config.json`` carrying ``vlkit_version``
    (written by ``save_model`` beside ``architecture``, and by the Hugging Face export), so a model folder of
    another tool (a Hugging Face checkout, with its README and tokenizer files) is never taken for one."""
    return (d / "model.safetensors").is_file() and "vlkit_version" in _json(d / "config.json")


def _is_checkpoint(d: Path) -> bool:
    """A checkpoint vlkit wrote: ``state.pt`` with vlkit's ``manifest.json`` (a format number and a table of
    files), or, written before manifests existed, ``state.pt`` alone inside a vlkit run's ``checkpoints/``."""
    if not (d / "state.pt").is_file():
        return False
    manifest = _json(d / "manifest.json")
    if isinstance(manifest.get("format"), int) and isinstance(manifest.get("files"), dict):
        return True
    return d.parent.name == "checkpoints" and output_kind(d.parent.parent) == "run"


# Outputs written before the marker existed, recognised by their own files (checked in this order). A quickstart
# folder is known by its marker only: a dataset beside a run or a sheet could be anyone's folder.
_EARLIER: dict[str, Callable[[Path], bool]] = {
    "index": lambda d: (d / "index.json").is_file() and (d / "db").is_dir(),
    "report": lambda d: REPORT_GENERATOR in _head(d / "index.html"),
    "run": lambda d: (d / "config.yaml").is_file() and ((d / "metrics.jsonl").is_file()
                                                        or (d / "checkpoints").is_dir()),
    "checkpoint": _is_checkpoint,
    "model": _is_model,
}


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def _label(path: Path, what: str | None) -> str:
    return f"{what} {path}" if what else str(path)


def output_kind(directory: str | Path) -> str | None:
    """The kind of vlkit output ``directory`` holds (its marker, or the files of an earlier output), or None."""
    directory = Path(directory)
    try:
        kind = json.loads((directory / MARKER_NAME).read_text()).get("kind")
        if isinstance(kind, str):
            return kind
    except (OSError, ValueError, AttributeError):
        pass
    for kind, test in _EARLIER.items():
        if test(directory):
            return kind
    return None


def write_marker(directory: str | Path, kind: str) -> None:
    """Mark ``directory`` as vlkit's own output of ``kind`` (what lets a later command replace it)."""
    from vlkit import __version__

    (Path(directory) / MARKER_NAME).write_text(json.dumps({"kind": kind, "vlkit_version": __version__}) + "\n")


def check_not_special(path: str | Path, *, inputs: Iterable[str | Path] = (), what: str | None = None) -> Path:
    """Refuse ``/``, the home folder, the current directory or one above it, an input or a folder that holds
    an input as an output path. Returns the resolved path.

    Raises:
        VlkitError: naming the path and why.
    """
    path = Path(path)
    label = _label(path, what)
    resolved = path.resolve()
    try:
        cwd: Path | None = Path.cwd().resolve()
    except OSError:  # the current directory was deleted
        cwd = None
    if resolved == Path(resolved.anchor) or resolved == Path.home().resolve():
        raise VlkitError(f"{label}: refusing to write over the root or home folder; name a new folder")
    if cwd is not None and (resolved == cwd or resolved in cwd.parents):
        raise VlkitError(f"{label}: refusing to write over the current directory (or one above it); "
                         "name a new folder")
    for item in inputs:
        source = Path(item).resolve()
        if resolved == source:
            raise VlkitError(f"{label}: is the input {item}; name a new folder")
        if resolved in source.parents:
            raise VlkitError(f"{label}: holds the input {item}; name a new folder")
    return resolved


def _check_creatable(path: Path, label: str) -> None:
    """The nearest existing folder above ``path`` must be a folder (not a file)."""
    for parent in path.parents:
        if os.path.lexists(parent):
            if not parent.is_dir():
                raise VlkitError(f"{label}: cannot create it ({parent} is not a directory)")
            return


def check_output_dir(directory: str | Path, kind: str = "model", *, inputs: Iterable[str | Path] = (),
                     what: str | None = None) -> bool:
    """Raise unless ``directory`` may be written as vlkit's ``kind`` output.

    Args:
        directory: the folder to write.
        kind: what it will hold (``index``, ``report``, ``run``, ``model``, ``checkpoint``, ``quickstart``...).
        inputs: paths the command reads; the output may not be one of them, nor hold one.
        what: how the user named it (``--out``), for messages.

    Returns:
        True when the folder exists (empty, or an earlier output of ``kind``) and will be replaced.

    Raises:
        VlkitError: the folder holds something else (files vlkit did not write, another kind of output), is a
            file, a link, a special path, or cannot be created.
    """
    directory = Path(directory)
    label = _label(directory, what)
    check_not_special(directory, inputs=inputs, what=what)
    if directory.is_symlink():
        raise VlkitError(f"{label}: is a symbolic link; name a folder")
    if not os.path.lexists(directory):
        _check_creatable(directory, label)
        return False
    if not directory.is_dir():
        raise VlkitError(f"{label}: exists and is not a directory")
    found = output_kind(directory)
    if found == kind:
        return True
    try:
        empty = not any(directory.iterdir())
    except OSError as exc:
        raise VlkitError(f"{label}: cannot read the folder ({_reason(exc)})") from None
    if empty:
        return True
    name = KIND_NAMES.get(kind, f"vlkit {kind}")
    if found is not None:
        raise VlkitError(f"{label}: holds a {KIND_NAMES.get(found, found)}, not an earlier {name}; "
                         "name a new folder")
    raise VlkitError(f"{label}: the folder exists and is not an earlier {name} (it holds files vlkit did not "
                     "write); name a new folder")


def check_output_file(path: str | Path, *, inputs: Iterable[str | Path] = (), what: str | None = None) -> Path:
    """Raise unless ``path`` may be written as a file: absent or a regular file, not an input, creatable.

    Returns:
        ``path``.
    """
    path = Path(path)
    label = _label(path, what)
    for item in inputs:
        if path.resolve() == Path(item).resolve():
            raise VlkitError(f"{label}: is the input {item}; name another file")
    if os.path.lexists(path):
        if path.is_dir():
            raise VlkitError(f"{label}: is a directory; name a file")
        if not path.is_file():
            raise VlkitError(f"{label}: exists and is not a regular file")
    else:
        _check_creatable(path, label)
    return path


def fsync_path(path: str | Path) -> None:
    """Flush a file or a folder's entries to disk (a no-op where the system cannot fsync a folder)."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if Path(path).is_dir() and hasattr(os, "O_DIRECTORY") else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file and folder under ``root`` (files first)."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(Path(folder) / name)
        fsync_path(folder)


def atomic_write(path: str | Path, data: bytes | str, *, durable: bool = False) -> Path:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``.

    Args:
        durable: fsync the file before the rename and the folder after it.

    Raises:
        VlkitError: the file cannot be written (read-only or full disk...), naming it; nothing is left behind.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
        if durable:
            fsync_path(path.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise VlkitError(f"{path}: cannot write ({_reason(exc)})") from None
    return path


def temporary_name_pattern(name: str) -> re.Pattern[str]:
    """The exact names :func:`atomic_directory` gives its temporaries beside a folder called ``name``
    (a regular expression; ``name`` may itself be a pattern)."""
    return re.compile(rf"^\.(?:{name})\.(?:tmp|old)-[a-z0-9_]{{8}}$")


def remove_temporaries(parent: str | Path, name: str) -> list[Path]:
    """Delete what an interrupted :func:`atomic_directory` left beside ``parent/<name>`` (only folders with
    its exact temporary names). Returns what was removed."""
    pattern, removed = temporary_name_pattern(name), []
    parent = Path(parent)
    if not parent.is_dir():
        return removed
    for entry in parent.iterdir():
        if pattern.match(entry.name) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _swap(tmp: Path, directory: Path) -> None:
    """Rename ``tmp`` to ``directory``; an existing ``directory`` is moved aside first and deleted after."""
    if not os.path.lexists(directory):
        os.replace(tmp, directory)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
    os.replace(directory, old)  # onto the empty folder just made
    try:
        os.replace(tmp, directory)
    except OSError:
        os.replace(old, directory)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(directory: str | Path, kind: str = "model", *, inputs: Iterable[str | Path] = (),
                     what: str | None = None, durable: bool = False) -> Iterator[Path]:
    """Fill a temporary folder beside ``directory``; on success it becomes ``directory`` in one rename.

    ``directory`` is checked first (:func:`check_output_dir`): an existing folder is replaced only when it is
    empty or an earlier vlkit output of ``kind``. The new folder carries the marker of ``kind`` (a model
    folder is known by its ``model.safetensors`` and the ``vlkit_version`` in its ``config.json`` instead). An
    interruption (exception, kill) leaves the old ``directory`` as it was and no half-written one.

    Args:
        directory: the folder to write.
        kind: what it holds (see :func:`check_output_dir`).
        inputs: paths the command reads (never replaced).
        what: how the user named it (``--out``), for messages.
        durable: fsync every file and the folders before and after the rename.

    Raises:
        VlkitError: the target may not be replaced, or the disk refuses (read-only, full), naming the path.

    Example:
        >>> with atomic_directory("runs/model") as tmp:
        ...     (tmp / "config.json").write_text("{}")
    """
    directory = Path(directory)
    inputs = list(inputs)
    label = _label(directory, what)
    check_output_dir(directory, kind, inputs=inputs, what=what)
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    except OSError as exc:
        raise VlkitError(f"{label}: cannot create the folder ({_reason(exc)})") from None
    try:
        yield tmp
        if kind not in UNMARKED_KINDS:
            write_marker(tmp, kind)
        if durable:
            fsync_tree(tmp)
        check_output_dir(directory, kind, inputs=inputs, what=what)  # it may have changed meanwhile
        _swap(tmp, directory)
        if durable:
            fsync_path(directory.parent)
    except OSError as exc:
        if exc.errno not in _DISK_ERRNOS:
            raise
        raise VlkitError(f"{label}: cannot write ({_reason(exc)})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
