"""Class labels of a vlkit dataset: the class list, the classes some rows hold, and a check that a split is
labelled.

Datasets ingested from class folders (or JSONL with ``label``/``class_name``) keep their class list, by label
index, in the schema metadata ``vlkit.classes``; older or hand-made datasets may only have the columns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import pyarrow.compute as pc

from vlkit.data.classes import classes_from_rows, placeholder
from vlkit.data.schema import class_names
from vlkit.data.store import open_dataset, split_indices
from vlkit.errors import DataError


def dataset_classes(dataset: str | Path) -> list[str]:
    """Class names by label index: the ``vlkit.classes`` metadata, else the distinct ``class_name`` of each label.

    A label that no row names gets ``"class_<label>"``. Returns ``[]`` for a dataset without labels.
    """
    ds = open_dataset(dataset)
    names = class_names(ds.schema)
    if names:
        return list(names)
    table = ds.to_table(columns=["label", "class_name"])
    return classes_from_rows(table.column("label").to_pylist(), table.column("class_name").to_pylist())


def require_labels(dataset: str | Path, split: str, task: str) -> int:
    """Check that every image of ``split`` has a class label, before anything is embedded.

    Returns:
        The number of images in the split.

    Raises:
        DataError: the split does not exist, or some of its images have no ``label``.
    """
    ds = open_dataset(dataset)
    offsets = split_indices(ds, split)
    labels = ds.take(offsets, columns=["label"]).column("label")
    missing = int(pc.sum(pc.is_null(labels)).as_py() or 0)
    if missing == len(offsets):
        raise DataError(f"{dataset}: split '{split}' has no class labels (column 'label' is empty); {task} needs "
                        "a labelled dataset, e.g. one ingested from class folders")
    if missing:
        raise DataError(f"{dataset}: {missing} of {len(offsets)} images of split '{split}' have no class label; "
                        f"{task} needs every image labelled")
    return len(offsets)


def classes_present(labels: Iterable[int], names: Sequence[str]) -> list[str]:
    """The names of the classes that occur in ``labels``, in label order.

    A classifier scores every class of the dataset, but a split (or its first ``--limit`` images) may hold only
    some of them: those are the classes an evaluation is about, and chance accuracy is one over their number.

    Args:
        labels: the true labels of the evaluated images.
        names: class names by label index.

    Returns:
        ``[names[label] for each distinct label]``, sorted by label; a label beyond ``names`` (rows labelled
        after the class list was stored) is named ``class_<label>``.

    Example:
        >>> classes_present([2, 0, 2], ["cat", "dog", "bird"])
        ['cat', 'bird']
        >>> classes_present([0, 5], ["cat", "dog"])
        ['cat', 'class_5']
    """
    return [names[label] if 0 <= label < len(names) else placeholder(label)
            for label in sorted({int(x) for x in labels})]
