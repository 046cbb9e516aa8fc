"""Hugging Face datasets saved with ``save_to_disk``: one ``Dataset`` folder, or a ``DatasetDict`` folder.

A ``Dataset`` folder holds ``dataset_info.json`` and ``state.json`` beside its Arrow files; a
``DatasetDict`` folder holds ``dataset_dict.json`` and one such folder per split, whose names become the
rows' splits (``validation``, ``valid`` and ``dev`` read as ``val``). Columns are chosen as for Parquet
(:mod:`vlkit.data.readers.parquet`): ``--image-column`` (an ``Image`` feature, binary bytes or a path),
``--text-column``, ``--id-column`` (default ``key``/``id``, else ``<folder>/<split>#<row>``).

Read with the ``datasets`` library (the optional extra ``vlkit[hf]``) as Arrow batches, so images are not
decoded by it: the ingest decode-checks their original bytes as for every other reader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from vlkit.data.records import Problem, Record
from vlkit.errors import DataError

from .parquet import BATCH_ROWS, choose_columns, extra_columns, row_record

MARKERS = ("dataset_dict.json", "state.json", "dataset_info.json")
SPLIT_NAMES = {"validation": "val", "valid": "val", "dev": "val"}


def is_hf_dataset(path: Path) -> bool:
    """Whether the folder ``path`` is a dataset saved by ``save_to_disk`` (it holds one of :data:`MARKERS`)."""
    return any((path / name).is_file() for name in MARKERS)


def _load(path: Path):
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: reading a Hugging Face dataset needs the 'datasets' package: "
                        "pip install 'vlkit[hf]'") from None
    try:
        return datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise DataError(f"{path}: not a readable Hugging Face dataset ({exc})") from None


def read_hf_dataset(path: Path, images_root: Path | None, problems: list[Problem], *,
                    image_column: str | None = None, text_column: str | None = None,
                    id_column: str | None = None) -> Iterator[Record]:
    """Records of every split of a dataset saved with ``save_to_disk``."""
    loaded = _load(path)
    parts = list(loaded.items()) if hasattr(loaded, "keys") else [(None, loaded)]
    for split_name, ds in parts:
        where = f"{path}/{split_name}" if split_name else str(path)
        schema = ds.data.schema  # the Arrow schema: an Image feature is a struct {bytes, path}
        columns = choose_columns(schema, where, image_column, text_column, id_column)
        extras = extra_columns(schema, {c for c in columns if c})
        split = SPLIT_NAMES.get(split_name, split_name) if split_name else None
        row_no = 0
        for table in ds.with_format("arrow").iter(batch_size=BATCH_ROWS):
            for row in table.to_pylist():
                default_id = f"{path.name}/{split_name}#{row_no}" if split_name else f"{path.name}#{row_no}"
                # image paths are relative to the dataset folder (``path / "x"`` has it as its parent)
                rec = row_record(row, row_no, columns, extras, path / "x", images_root, problems, where,
                                 default_id)
                row_no += 1
                if rec is not None:
                    if split is not None:
                        rec.split = split
                    yield rec
