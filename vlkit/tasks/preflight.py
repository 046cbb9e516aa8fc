"""Checks of every dataset a training config needs, made before the first step and before anything is written.

A run that would fail at its first evaluation (a validation split that does not exist, a column a task reads
that is empty) fails at once instead, with every problem of every dataset in one error, one line each, naming
the dataset key, its path and the split or column:

    datasets.coco.val_split: split 'nosuch' has no rows in data/coco.lance (splits present: test, train, val)

Each dataset is opened once and its split column and the columns its tasks read (:meth:`Task.reads
<vlkit.tasks.base.Task.reads>`) are read once.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from vlkit.config.schema import DatasetConfig, TaskConfig, TrainConfig
from vlkit.errors import DataError


class DatasetCheckError(DataError):
    """Datasets of a config that training cannot use; ``problems`` holds one line per problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        count = len(self.problems)
        header = f"the datasets of this config cannot be trained on ({count} problem{'s' if count != 1 else ''}):"
        super().__init__("\n".join([header, *self.problems]))


def task_reads(task: TaskConfig) -> list[str]:
    """The columns the task named in ``task`` reads (see :meth:`vlkit.tasks.base.Task.reads`)."""
    from vlkit.tasks import TASKS, classification, itm, nlvr2, retrieval, vqa  # noqa: F401  (the built-in tasks)
    from vlkit.tasks import mae, visdial  # noqa: F401
    from vlkit.tasks import beit, vqvae  # noqa: F401

    return TASKS[task.name].reads(task) if task.name in TASKS else []


def _filled(column: pa.ChunkedArray) -> int:
    """Rows holding a value: a non-empty list for list columns, a non-null value otherwise."""
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        return int(pc.sum(pc.greater(pc.fill_null(pc.list_value_length(column), 0), 0)).as_py() or 0)
    return len(column) - column.null_count


def check_dataset(key: str, data: DatasetConfig, tasks: Sequence[TaskConfig]) -> list[str]:
    """The problems of one dataset for the tasks that train on it (empty when it is fine).

    Args:
        key: the dataset's key in the config (``datasets.<key>``).
        data: its config (path, splits).
        tasks: the tasks that read it.

    Returns:
        One ``datasets.<key>...: what is wrong`` line per problem.
    """
    from vlkit.data.store import open_dataset

    where, path = f"datasets.{key}", Path(data.path)
    try:
        ds = open_dataset(path)  # exists, is a Lance dataset, no data file missing
    except DataError as exc:
        return [f"{where}.path: {exc}"]
    names = ds.schema.names
    if "split" not in names:
        return [f"{where}.path: {path}: has no 'split' column; is it a dataset made by 'vlkit ingest'?"]
    problems: list[str] = []
    readers: dict[str, list[str]] = {}
    for task in tasks:
        for column in task_reads(task):
            readers.setdefault(column, [])
            if task.name not in readers[column]:
                readers[column].append(task.name)
    for column, by in readers.items():
        if column not in names:
            problems.append(f"{where}: {path} has no column '{column}', which task {' and '.join(by)} reads")
    columns = [c for c in readers if c in names]
    table = ds.to_table(columns=["split", *columns])
    splits = table.column("split")
    counts = collections.Counter(splits.to_pylist())
    present = ", ".join(sorted(str(s) for s in counts if s is not None)) or "none"
    roles = [("train_split", data.train_split)] + ([("val_split", data.val_split)] if data.val_split else [])
    for role, split in roles:
        rows = counts.get(split, 0)
        if not rows:
            problems.append(f"{where}.{role}: split {split!r} has no rows in {path} (splits present: {present})")
            continue
        mask = pc.fill_null(pc.equal(splits, split), False)
        for column in columns:
            filled = _filled(table.column(column).filter(mask))
            tasks_named = f"task {' and '.join(readers[column])}"
            if not filled:
                problems.append(f"{where}.{role}: column '{column}' is empty in split {split!r} of {path}; "
                                f"{tasks_named} reads it")
            elif column == "label" and filled < rows:
                problems.append(f"{where}.{role}: {rows - filled} of {rows} rows of split {split!r} of {path} have "
                                f"no label; {tasks_named} needs every row labelled")
    return problems


def check_datasets(cfg: TrainConfig) -> None:
    """Check every dataset the tasks of ``cfg`` train on (see the module docstring).

    Raises:
        DatasetCheckError: listing every problem of every dataset, one line each.
    """
    by_key: dict[str, list[TaskConfig]] = {}
    for task in cfg.tasks:
        by_key.setdefault(task.dataset, []).append(task)
    problems = [line for key, tasks in by_key.items() for line in check_dataset(key, cfg.datasets[key], tasks)]
    if problems:
        raise DatasetCheckError(problems)
