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
from .nlvr2 import is_nlvr2, read_nlvr2
from .hf_dataset import is_hf_dataset, read_hf_dataset
from .parquet import read_parquet
from .snli_ve import is_snli_ve, read_snli_ve
from .textvqa import is_textvqa, read_textvqa
from .visdial import is_visdial, read_visdial
from .vqa import read_vqa
from .webdataset import expand_shards, is_shard_pattern, read_webdataset

Reader = Callable[[Path, "Path | None", list[Problem]], Iterator[Record]]

READERS: dict[str, Reader] = {
    "csv": read_csv,
    "coco": read_coco,
    "jsonl": read_jsonl,
    "folder": read_folder,
    "vqa": read_vqa,
    "nlvr2": read_nlvr2,
    "textvqa": read_textvqa,
    "visdial": read_visdial,
    "webdataset": read_webdataset,
    "parquet": read_parquet,
    "hf": read_hf_dataset,
    "snli-ve": read_snli_ve,
}
FORMATS = tuple(READERS)
COLUMN_READERS = ("parquet", "hf")
"""Readers that take the column options (``image_column``, ``text_column``, ``id_column``)."""


def detect_format(path: Path) -> str:
    """Name the reader for ``path`` from its kind, extension and (for JSON) its top-level keys.

    Raises:
        DataError: when the path does not exist or its format cannot be told.
    """
    if "{" in str(path) and is_shard_pattern(path):
        return "webdataset"
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_dir():
        return "hf" if is_hf_dataset(path) else "folder"
    suffix = path.suffix.lower()
    if suffix == ".tar":
        return "webdataset"
    if suffix == ".parquet":
        return "parquet"
    if suffix in (".csv", ".tsv", ".txt"):
        return "csv"
    if suffix in (".jsonl", ".ndjson", ".json") and is_nlvr2(path):  # NLVR2's .json files are JSON lines
        return "nlvr2"
    if suffix in (".jsonl", ".ndjson"):
        return "snli-ve" if is_snli_ve(path) else "jsonl"
    if suffix == ".json":
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"{path}: not valid JSON ({exc})") from None
        if isinstance(data, list) and data and isinstance(data[0], dict) and "question" in data[0]:
            return "vqa"
        if is_textvqa(data):
            return "textvqa"
        if is_visdial(data):
            return "visdial"
        if isinstance(data, dict):
            if "questions" in data:
                return "vqa"
            if "images" in data:
                return "coco"
        raise DataError(
            f"{path}: cannot tell the format of this JSON file "
            "(expected COCO captions with 'images'/'annotations', VQA questions, TextVQA's 'data' or VisDial's "
            "'data.dialogs'); pass --format"
        )
    raise DataError(f"{path}: unknown file type '{suffix}'; pass --format ({', '.join(FORMATS)})")


def read_source(path: Path, fmt: str, images_root: Path | None, problems: list[Problem],
                **columns: str | None) -> Iterator[Record]:
    """Records of one source, read by the named reader (``auto`` detects it).

    Args:
        path: the source (for ``webdataset``, a brace pattern of shards is allowed).
        fmt: reader name or ``auto``.
        images_root: folder the source's image paths are relative to, or None.
        problems: where skipped rows are reported.
        **columns: ``image_column``, ``text_column``, ``id_column`` for the readers in
            :data:`COLUMN_READERS` (ignored by the others).
    """
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt not in READERS:
        raise DataError(f"unknown format '{fmt}'; choose one of: auto, {', '.join(FORMATS)}")
    if fmt == "webdataset":
        if not any(p.exists() for p in expand_shards(path)):
            raise DataError(f"{path}: no such file or directory (no shard of the pattern exists)")
    elif not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if fmt in COLUMN_READERS:
        return READERS[fmt](path, images_root, problems, **{k: v for k, v in columns.items() if v})
    return READERS[fmt](path, images_root, problems)
