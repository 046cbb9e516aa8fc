"""Caption CSV, one row per caption: ``image,caption`` (the Flickr8k layout).

Optional columns: ``split``; any other column is kept as an extra field (first value per image).

A quote opened in a field and not closed on its line makes the CSV parser swallow the following lines into
that field. A row spanning several lines whose later lines would each parse as rows of their own (or whose
quote is still open at the end of the file) is reported with its line numbers and skipped; the lines it
swallowed are read again as the rows they are.
"""

from __future__ import annotations

import csv
import io
from collections import deque
from pathlib import Path
from typing import IO, Iterator

from vlkit.data.records import Problem, Record
from vlkit.errors import DataError

from .common import bad_text, confinement_root, image_id, images_root_for

IMAGE_KEYS = ("image", "image_name", "filename", "file_name", "path")
CAPTION_KEYS = ("caption", "text", "comment", "sentence")


def _pick(header: list[str], names: tuple[str, ...], path: Path) -> str:
    lowered = {h.strip().lower(): h for h in header}
    for name in names:
        if name in lowered:
            return lowered[name]
    raise DataError(f"{path}: header {header} has no column named any of {list(names)}")


class _Lines:
    """The file's lines for ``csv.reader``, numbered, remembering those of the current row, with push-back."""

    def __init__(self, fh: IO[str]):
        self._fh = fh
        self._back: deque[tuple[int, str]] = deque()
        self._next_no = 1
        self.taken: list[tuple[int, str]] = []

    def __iter__(self) -> "_Lines":
        return self

    def __next__(self) -> str:
        if self._back:
            no, line = self._back.popleft()
        else:
            line = next(self._fh)
            no, self._next_no = self._next_no, self._next_no + 1
        self.taken.append((no, line))
        return line

    def push_back(self, lines: list[tuple[int, str]]) -> None:
        self._back.extendleft(reversed(lines))


def _run_on(taken: list[tuple[int, str]], width: int, delimiter: str) -> bool:
    """Whether a row read from several lines ``taken`` is an unclosed quote that swallowed other rows."""
    if not taken:
        return False
    if not taken[-1][1].endswith(("\n", "\r")):  # the last line of the file: is a quote still open?
        try:
            list(csv.reader(io.StringIO("".join(line for _, line in taken)), delimiter=delimiter, strict=True))
        except csv.Error as exc:
            return "unexpected end of data" in str(exc)
        return False
    for _, line in taken[1:]:
        try:
            fields = next(csv.reader([line], delimiter=delimiter), [])
        except csv.Error:
            continue
        if len(fields) == width:
            return True
    return False


def read_csv(path: Path, images_root: Path | None, problems: list[Problem]) -> Iterator[Record]:
    """Yield one record per image, its captions gathered from all its rows."""
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as fh:
        lines = _Lines(fh)
        reader = csv.reader(lines, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(f"{path}: empty file, expected a header like 'image,caption'") from None
        except csv.Error as exc:
            raise DataError(f"{path}: unreadable CSV header ({exc})") from None
        image_col = header.index(_pick(header, IMAGE_KEYS, path))
        caption_col = header.index(_pick(header, CAPTION_KEYS, path))
        split_col = next((i for i, h in enumerate(header) if h.strip().lower() == "split"), None)
        extra_cols = [i for i in range(len(header)) if i not in (image_col, caption_col, split_col)]
        records: dict[str, Record] = {}
        root: Path | None = None
        while True:
            lines.taken = []
            try:
                row = next(reader)
                error = None
            except StopIteration:
                break
            except csv.Error as exc:
                row, error = None, exc
            taken = lines.taken
            row_no = taken[0][0] if taken else 0
            if error is not None or _run_on(taken, len(header), delimiter):
                span = f"over lines {row_no}-{taken[-1][0]}" if len(taken) > 1 else "to the end of the file"
                reason = (f"unreadable CSV row ({error})" if error is not None else
                          f"a quote opened on this line is not closed on it, so the row runs on {span} "
                          "(unbalanced quote); the row is skipped, the lines after it are read on their own")
                problems.append(Problem(str(path), row_no, reason))
                lines.push_back(taken[1:])
                continue
            if not row:
                continue
            if len(row) != len(header):
                problems.append(
                    Problem(str(path), row_no, f"expected {len(header)} fields, found {len(row)}")
                )
                continue
            name, caption = row[image_col].strip(), row[caption_col].strip()
            if not name:
                problems.append(Problem(str(path), row_no, "empty image name"))
                continue
            reason = bad_text(caption) or bad_text(name)
            if reason:
                problems.append(Problem(str(path), row_no, reason))
                continue
            if root is None:
                root = images_root_for(path, images_root, name)
            image_path = root / name
            key = image_id(image_path, root)
            rec = records.get(key)
            if rec is None:
                rec = records[key] = Record(
                    id=key,
                    image_path=image_path,
                    source=f"{path}:{row_no}",
                    split=row[split_col].strip() or None if split_col is not None else None,
                    extra={header[i].strip(): row[i] for i in extra_cols},
                    root=confinement_root(path, images_root),
                )
            rec.captions.append(caption)
    yield from records.values()
