"""Opening vlkit Lance datasets and describing what they hold."""

from __future__ import annotations

import collections
import contextlib
import fcntl
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import lance
import pyarrow.compute as pc

from vlkit.data.schema import CORE_NAMES, class_names
from vlkit.errors import DataError

T = TypeVar("T")


class DamagedDataset(DataError):
    """A data file the dataset's current version lists is missing; the message names the dataset and file."""


class OpenedDataset(os.PathLike):
    """A dataset opened once for a whole command, accepted wherever a dataset path is.

    Functions that open a dataset (:func:`open_dataset`, :class:`~vlkit.data.dataset.LanceImageTextDataset`)
    take the handle's open dataset instead of opening it again, and its splits are found once. ``str()`` and
    ``os.fspath()`` give the path, so messages and worker processes see the path as before.

    Example:
        >>> data = OpenedDataset.open("coco.lance")
        >>> require_labels(data, "test"); compute_embeddings(loaded, data, "test")  # one open for both
    """

    def __init__(self, path: str | Path, ds: lance.LanceDataset):
        self.path = Path(path)
        self.ds = ds
        self._splits: dict[str | None, list[int]] = {}

    @classmethod
    def open(cls, path: str | Path | OpenedDataset, *, check_files: bool = True) -> OpenedDataset:
        """Open ``path`` (a handle is returned as it is); errors as :func:`open_dataset`'s."""
        if isinstance(path, OpenedDataset):
            return path
        return cls(path, open_dataset(path, check_files=check_files))

    def split(self, split: str | None) -> list[int]:
        """Row offsets of ``split`` (:func:`split_indices`), found once per handle."""
        if split not in self._splits:
            self._splits[split] = split_indices(self.ds, split)
        return list(self._splits[split])

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"OpenedDataset({str(self.path)!r}, version={self.ds.version})"


def open_dataset(path: str | Path | OpenedDataset, *, check_files: bool = True) -> lance.LanceDataset:
    """Open a Lance dataset, or raise one clear error naming the path.

    Args:
        path: the dataset directory, or an :class:`OpenedDataset` (its dataset is returned, not reopened).
        check_files: also check that every data file of the current version is there (a stat per file).

    Raises:
        DataError: no dataset at ``path``, or not a readable Lance dataset.
        DamagedDataset: a data file is missing (see :func:`check_data_files`).
    """
    if isinstance(path, OpenedDataset):
        return path.ds
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such dataset (create one with 'vlkit ingest ... --out {path}')")
    try:
        ds = lance.dataset(str(path))
    except (OSError, ValueError, RuntimeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path}: not a readable Lance dataset ({first_line})") from None
    if check_files:
        check_data_files(ds, path)
    return ds


def missing_data_files(ds: lance.LanceDataset) -> list[Path]:
    """The data files listed by the dataset's current version that are not on disk (local datasets only)."""
    root = Path(ds.uri)
    if "://" in ds.uri or not root.is_dir():
        return []
    missing = []
    for fragment in ds.get_fragments():
        for data_file in fragment.metadata.files:
            if getattr(data_file, "base_id", None) is not None:  # stored under another base: not checked here
                continue
            file = root / "data" / data_file.path
            if not file.exists():
                missing.append(file)
    return missing


def damaged_error(path: str | Path, missing: list[Path]) -> DamagedDataset:
    """The one-line error for dataset ``path`` whose data files ``missing`` are gone."""
    first = missing[0]
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    return DamagedDataset(f"{path}: the dataset is damaged: data file {first.name} is missing{more} ({first}); "
                          "restore it from a backup or ingest the data again")


def check_data_files(ds: lance.LanceDataset, path: str | Path | None = None) -> None:
    """Raise :class:`DamagedDataset` naming the dataset and the first missing file, if any file is missing.

    Every reader gets this check through :func:`open_dataset`; a reader holding a dataset opened earlier (a
    DataLoader worker) can call it when a read fails, to name the file.
    """
    missing = missing_data_files(ds)
    if missing:
        raise damaged_error(path if path is not None else ds.uri, missing)


def lock_path(path: str | Path) -> Path:
    """The lock file that writers of dataset ``path`` take turns on: ``.<name>.lock`` beside the dataset."""
    path = Path(path)
    return path.parent / f".{path.name}.lock"


@contextlib.contextmanager
def write_lock(path: str | Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold the write lock of dataset ``path`` (an exclusive ``flock``) for the ``with`` block.

    Writers that read the dataset, decide what to add and then commit (ingest) hold it from the read to the
    commit, so two of them never add the same rows. The lock is released when the process ends, however it
    ends; the lock file itself is left in place (empty) for the next writer.

    Args:
        path: the dataset directory (it need not exist yet).
        on_wait: called once if another process holds the lock, before waiting for it.
    """
    file = lock_path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    with open(file, "a+b") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def is_commit_conflict(exc: BaseException) -> bool:
    """Whether ``exc`` is Lance refusing a commit because another process committed first."""
    return type(exc).__name__ == "CommitConflictError" or "commit conflict" in str(exc).lower()


def retry_on_conflict(action: Callable[..., T], path: str | Path, what: str, tries: int = 5, *,
                      dataset: lance.LanceDataset | None = None) -> T:
    """Run ``action``, again after a short pause if a concurrent commit won.

    Args:
        action: without ``dataset``, called with no argument (it must open the dataset itself); with it,
            called with the dataset to build on.
        path: the dataset directory.
        what: what the action does, for the error (``"the embeddings were written"``).
        tries: attempts before giving up.
        dataset: an open handle: the first attempt uses it, so nothing is opened again unless a concurrent
            commit won; later attempts get the dataset re-opened at its latest version.

    Raises:
        DataError: still conflicting after ``tries`` attempts; one line naming the dataset and ``what``.
    """
    for attempt in range(tries):
        try:
            if dataset is None:
                return action()
            return action(dataset if attempt == 0 else open_dataset(path, check_files=False))
        except (OSError, ValueError, RuntimeError) as exc:
            if not is_commit_conflict(exc):
                raise
            time.sleep(0.05 * 2**attempt)
    raise DataError(f"{path}: other processes kept changing the dataset while {what}; nothing of it was "
                    "committed, run the command again")


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
        # rows holding a second image (NLVR2 pairs); 0 for single-image datasets
        "pairs": (ds.count_rows() - ds.to_table(columns=["image2"]).column("image2").null_count
                  if "image2" in ds.schema.names else 0),
        # rows holding a video (vlkit.data.ingest_videos); 0 for datasets of images
        "videos": (ds.count_rows() - ds.to_table(columns=["video"]).column("video").null_count
                   if "video" in ds.schema.names else 0),
    }

