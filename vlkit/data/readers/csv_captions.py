"""Caption CSV, one row per caption: ``image,caption`` (the Flickr8k layout).

Optional columns: ``split``; any other column is kept as an extra field (first value per image).

A quoted field may hold line breaks (a caption over several lines). A quote opened in a field and never
closed instead makes the CSV parser swallow the following lines into that field. Such a run-on is told from a
caption with line breaks by its quoting (see :func:`_run_on`): the quote is still open at the end of the file,
or the quote that ends the field is followed by text (it was the opening quote of a later row), or a
swallowed line is a complete row naming an image file that exists. A run-on is reported with its line numbers
and skipped; the lines it swallowed are read again as the rows they are.
"""

from __future__ import annotations

import csv
import io
from collections import deque
from pathlib import Path
from typing import IO, Callable, Iterator

from vlkit.data.records import Problem, Record
from vlkit.errors import DataError

from .common import bad_text, confinement_root, image_id, images_root_for

IMAGE_KEYS = ("image", "image_name", "filename", "file_name", "path", "video", "video_path")
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


def _run_on(taken: list[tuple[int, str]], width: int, delimiter: str,
            names_image: Callable[[list[str]], bool]) -> str | None:
    """Whether the row read from the lines ``taken`` is an unclosed quote: ``"end"`` (open at the end of the
    file), ``"rows"`` (it swallowed rows of its own), or None (a row as written).

    The row's text is parsed again strictly. A quote still open at the end of the file is a run-on, on one line
    or several. A row over several lines is a run-on when its quoting is malformed: the quote that ended the
    field was the opening quote of a later row, followed by text rather than a delimiter or the line's end.
    A well-formed field over several lines (a caption with a line break) is kept whole, unless one of its
    later lines is, read on its own, a complete row naming an image file that exists: in doubt, it is
    reported rather than read as a caption.
    """
    text = "".join(line for _, line in taken)
    if '"' not in text:
        return None
    try:
        list(csv.reader(io.StringIO(text), delimiter=delimiter, strict=True))
    except csv.Error as exc:
        if "unexpected end of data" in str(exc):
            return "end"
        return "rows" if len(taken) > 1 else None  # a stray quote on one line: read as the lenient parser does
    for _, line in taken[1:]:
        try:
            fields = next(csv.reader([line], delimiter=delimiter), [])
        except csv.Error:
            continue
        if len(fields) == width and names_image(fields):
            return "rows"
    return None


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

        def names_image(fields: list[str]) -> bool:
            """Whether a line read on its own names an image file that exists (so it is a row of its own)."""
            name = fields[image_col].strip()
            base = root if root is not None else images_root_for(path, images_root, name)
            return bool(name) and (base / name).is_file()

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
            run_on = None if error is not None else _run_on(taken, len(header), delimiter, names_image)
            if error is not None or run_on:
                span = "to the end of the file" if run_on == "end" else f"over lines {row_no}-{taken[-1][0]}"
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
