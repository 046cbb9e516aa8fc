"""Errors that name the dataset row (or data file) a read failed on, as one line.

Every reader of a Lance dataset's rows (the torch dataset, contact sheets, thumbnails) reports a bad image as
``<dataset> row id '<id>': <reason>`` and a damaged dataset (a data file deleted from ``data/``) as
``<dataset>: data file <name> is missing ...``, never as a traceback.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Iterator

import lance

from vlkit.data.decode import ImageDecodeError
from vlkit.data.store import DamagedDataset, damaged_error, missing_data_files
from vlkit.errors import DataError

_NOT_FOUND = re.compile(r"Not found: (\S+?)(?:,|\s|$)")


class RowError(DataError):
    """A row of a dataset cannot be read; the message names the dataset and the row or file.

    Raised in a DataLoader worker, it reaches the main process rebuilt by torch from the text
    ``"Caught RowError in DataLoader worker process N.\\nOriginal Traceback ..."``; the original one-line
    message is recovered from the last line of that text, so the command line still prints one line.
    """

    def __init__(self, message: str):
        super().__init__(_original_message(message, type(self)))


class DamagedRows(RowError, DamagedDataset):
    """Rows of a dataset cannot be read because a data file is missing; the message names the file."""


def _original_message(message: str, cls: type) -> str:
    """The message of ``cls`` inside a traceback text that torch wrapped around it (else ``message``)."""
    if not message.startswith("Caught ") or "Traceback" not in message:
        return message
    prefix = f"{cls.__module__}.{cls.__qualname__}: "
    lines = [line for line in message.splitlines() if line.startswith(prefix)]
    return lines[-1][len(prefix):] if lines else message


def image_error(dataset: str | Path, row_id: str, exc: Exception) -> RowError:
    """The error for the image of row ``row_id`` that failed to decode with ``exc``.

    Args:
        dataset: the dataset's path (as the user gave it).
        row_id: the row's ``id``.
        exc: an :class:`~vlkit.data.decode.ImageDecodeError` or an error with a ``reason`` attribute.
    """
    reason = getattr(exc, "reason", None) or str(exc)
    return RowError(f"{dataset} row id '{row_id}': {reason}")


@contextlib.contextmanager
def reading(dataset: str | Path) -> Iterator[None]:
    """Map Lance's errors while reading rows of ``dataset`` to one-line :class:`RowError` s.

    A data file missing from ``data/`` is named; any other Lance read error is reported by its first line.
    """
    try:
        yield
    except (OSError, ValueError) as exc:
        if isinstance(exc, (ImageDecodeError, DataError)):
            raise
        raise missing_file_error(dataset, exc) from None


def missing_file_error(dataset: str | Path, exc: Exception) -> RowError:
    """A :class:`RowError` for a Lance read of ``dataset`` that failed with ``exc``: a
    :class:`DamagedRows` naming the missing data files when some are gone (as
    :func:`vlkit.data.store.check_data_files` words it)."""
    text = str(exc)
    try:
        missing = missing_data_files(lance.dataset(str(dataset)))
    except (OSError, ValueError, RuntimeError):
        missing = []
    found = _NOT_FOUND.search(text)
    if not missing and found:
        file = Path(found.group(1))
        missing = [Path(dataset) / "data" / file.name if file.parent.name == "data" else file]
    if missing:
        return DamagedRows(str(damaged_error(dataset, missing)))
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return RowError(f"{dataset}: cannot read rows ({first})")
