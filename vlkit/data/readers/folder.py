"""Image folders as classes: ``root/<class>/<image>``.

The reader names each image's class; labels are given at ingest, new class names in sorted order after the
classes the dataset already holds (so a new dataset's labels follow the sorted class names).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from vlkit.data.records import Problem, Record
from vlkit.errors import DataError


def read_folder(path: Path, images_root: Path | None, problems: list[Problem]) -> Iterator[Record]:
    classes = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{path}: no class folders found (expected {path}/<class>/<image>)")
    for name in classes:
        for file in sorted((path / name).iterdir()):
            if file.name.startswith(".") or file.is_dir():
                continue
            yield Record(
                id=f"{name}/{file.name}",
                image_path=file,
                source=str(file),
                captions=[],
                class_name=name,
                root=path,
            )
