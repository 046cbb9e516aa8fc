"""Ingest readers, one per source format. Each yields :class:`~vlkit.data.records.Record` objects
and appends a :class:`~vlkit.data.records.Problem` for every row it has to skip."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator

from vlkit.data.records import Problem, Record
from vlkit.errors import DataError

from .coco import read_coco
from .csv_captions import read_csv
from .folder import read_folder
from .jsonl import read_jsonl
from .vqa import read_vqa

Reader = Callable[[Path, "Path | None", list[Problem]], Iterator[Record]]

READERS: dict[str, Reader] = {
    "csv": read_csv,
    "coco": read_coco,
    "jsonl": read_jsonl,
    "folder": read_folder,
    "vqa": read_vqa,
}
FORMATS = tuple(READERS)


def detect_format(path: Path) -> str:
    """Name the reader for ``path`` from its kind, extension and (for JSON) its top-level keys.

    Raises:
        DataError: when the path does not exist or its format cannot be told.
    """
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_dir():
        return "folder"
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv", ".txt"):
        return "csv"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".json":
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"{path}: not valid JSON ({exc})") from None
        if isinstance(data, list) and data and isinstance(data[0], dict) and "question" in data[0]:
            return "vqa"
        if isinstance(data, dict):
            if "questions" in data:
                return "vqa"
            if "images" in data:
                return "coco"
        raise DataError(
            f"{path}: cannot tell the format of this JSON file "
            "(expected COCO captions with 'images'/'annotations', or VQA questions); pass --format"
        )
    raise DataError(f"{path}: unknown file type '{suffix}'; pass --format ({', '.join(FORMATS)})")


def read_source(path: Path, fmt: str, images_root: Path | None, problems: list[Problem]) -> Iterator[Record]:
    """Records of one source, read by the named reader (``auto`` detects it)."""
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt not in READERS:
        raise DataError(f"unknown format '{fmt}'; choose one of: auto, {', '.join(FORMATS)}")
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    return READERS[fmt](path, images_root, problems)
