"""Opening vlkit Lance datasets and describing what they hold."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import lance
import pyarrow.compute as pc

from vlkit.data.schema import CORE_NAMES, class_names
from vlkit.errors import DataError


def open_dataset(path: str | Path) -> lance.LanceDataset:
    """Open a Lance dataset, or raise one clear error naming the path."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such dataset (create one with 'vlkit ingest ... --out {path}')")
    try:
        return lance.dataset(str(path))
    except (OSError, ValueError, RuntimeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path}: not a readable Lance dataset ({first_line})") from None


def split_indices(ds: lance.LanceDataset, split: str | None) -> list[int]:
    """Row offsets of the rows in ``split`` (all rows when None), in dataset order."""
    if split is None:
        return list(range(ds.count_rows()))
    splits = ds.to_table(columns=["split"]).column("split")
    mask = pc.equal(splits, split)
    offsets = pc.indices_nonzero(pc.fill_null(mask, False)).to_pylist()
    if not offsets:
        present = sorted(s for s in set(splits.to_pylist()) if s is not None)
        raise DataError(f"{ds.uri}: no rows in split '{split}' (splits present: {present})")
    return offsets


def dataset_info(path: str | Path) -> dict[str, Any]:
    """Counts a person wants to see about a dataset: rows, captions, splits, classes, questions, size."""
    ds = open_dataset(path)
    table = ds.to_table(columns=["split", "captions", "class_name", "questions"])
    splits = collections.Counter(table.column("split").to_pylist())
    captions = pc.sum(pc.list_value_length(table.column("captions"))).as_py() or 0
    questions = pc.sum(pc.list_value_length(table.column("questions"))).as_py() or 0
    per_class = collections.Counter(c for c in table.column("class_name").to_pylist() if c is not None)
    size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    extra = [n for n in ds.schema.names if n not in CORE_NAMES]
    return {
        "path": str(path),
        "rows": ds.count_rows(),
        "images": ds.count_rows(),
        "captions": int(captions),
        "questions": int(questions),
        "splits": dict(sorted(splits.items(), key=lambda kv: str(kv[0]))),
        "classes": class_names(ds.schema) or sorted(per_class),
        "images_per_class": dict(sorted(per_class.items())),
        "fragments": len(ds.get_fragments()),
        "bytes_on_disk": size,
        "version": ds.version,
        "versions": len(ds.versions()),
        "indices": sorted(i.name for i in ds.describe_indices()),
        "extra_columns": extra,
    }

