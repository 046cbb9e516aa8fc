"""Caption CSV, one row per caption: ``image,caption`` (the Flickr8k layout).

Optional columns: ``split``; any other column is kept as an extra field (first value per image).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterator

from vlkit.data.records import Problem, Record
from vlkit.errors import DataError

from .common import bad_text, image_id, images_root_for

IMAGE_KEYS = ("image", "image_name", "filename", "file_name", "path")
CAPTION_KEYS = ("caption", "text", "comment", "sentence")


def _pick(header: list[str], names: tuple[str, ...], path: Path) -> str:
    lowered = {h.strip().lower(): h for h in header}
    for name in names:
        if name in lowered:
            return lowered[name]
    raise DataError(f"{path}: header {header} has no column named any of {list(names)}")


def read_csv(path: Path, images_root: Path | None, problems: list[Problem]) -> Iterator[Record]:
    """Yield one record per image, its captions gathered from all its rows."""
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as fh:
        reader = csv.reader(fh, delimiter=delimiter)
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
        row_no = 1
        while True:
            row_no += 1
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                problems.append(Problem(str(path), row_no, f"unreadable CSV row ({exc})"))
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
                )
            rec.captions.append(caption)
    yield from records.values()
