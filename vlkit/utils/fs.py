"""File-system helpers: directories that appear whole or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_directory(directory: str | Path) -> Iterator[Path]:
    """Fill a temporary directory beside ``directory``; on success it replaces ``directory`` in one rename.

    An interruption (exception, kill) leaves the old ``directory`` as it was and no half-written one.

    Example:
        >>> with atomic_directory("runs/model") as tmp:
        ...     (tmp / "config.json").write_text("{}")
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        yield tmp
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
