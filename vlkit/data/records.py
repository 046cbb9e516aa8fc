"""The record every reader yields: one image with its texts, label and questions."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


@dataclass
class Record:
    """One image and what the source says about it, before the image is read.

    Args:
        id: stable key of the image in its source (e.g. its path relative to the images root).
        image_path: where the encoded image lies on disk.
        source: the file (and row) the record came from, for reports.
        captions: the image's captions.
        label: class index, for class-folder data.
        class_name: class name, for class-folder data.
        questions: questions about the image.
        answers: for each question, the human answers (one or several).
        split: the split the source assigns, or None to derive it from the id.
        extra: any further fields of the source, stored as extra columns.
        root: the folder the image must lie in (the images root, or the source's folder), or None.
        image_data: for sources that hold the encoded bytes themselves (tar shards, Parquet, Hugging Face
            datasets): a function of the byte limit that returns them, raising
            :class:`~vlkit.data.images.ImageProblem` when they are larger; ``image_path`` then only names
            them in reports and the ``source`` column.
        image2_path: the second image of a row of two images (NLVR2's right image), read and checked like the
            first inside the same ``root``; None for a single-image row.
    """

    id: str
    image_path: Path
    source: str
    captions: list[str] = field(default_factory=list)
    label: int | None = None
    class_name: str | None = None
    questions: list[str] = field(default_factory=list)
    answers: list[list[str]] = field(default_factory=list)
    split: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    root: Path | None = None
    image_data: Callable[[int], bytes] | None = None
    image2_path: Path | None = None

    def merge(self, other: "Record") -> None:
        """Fold another record of the same image (e.g. its VQA questions) into this one."""
        self.captions.extend(c for c in other.captions if c not in self.captions)
        self.questions.extend(other.questions)
        self.answers.extend(other.answers)
        if self.label is None and self.class_name is None:
            self.label, self.class_name = other.label, other.class_name
        elif self.label is None and other.class_name == self.class_name:  # a class folder named as the source does
            self.label = other.label
        if self.split is None:
            self.split = other.split
        for key, value in other.extra.items():
            self.extra.setdefault(key, value)


@dataclass
class Problem:
    """An input that was skipped: where it is and why."""

    file: str
    row: int | str | None
    reason: str

    def __str__(self) -> str:
        where = self.file if self.row is None else f"{self.file}:{self.row}"
        return f"{where}: {self.reason}"
