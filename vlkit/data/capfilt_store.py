"""Writing CapFilt's kept captions into a Lance dataset: a new version of the dataset, or a new dataset.

The ``captions`` column is replaced, and three columns say where each caption came from:
``caption_sources`` (``original`` or ``synthetic``, one per caption), ``caption_scores`` (the filter's matching
probability of each kept caption; null for rows that were not filtered) and ``captions_dropped`` (the texts the
filter removed). Rows outside the filtered split keep their captions. The images are not rewritten: the new
columns go into new data files joined on ``id`` and one commit brings them in (see
:func:`vlkit.data.columns.replace_columns`), so the version before remains readable and complete.

With ``out``, the dataset is first copied beside ``out`` under a temporary name (its immutable data files
hard-linked where the file system allows, everything else copied), the columns are committed there, and the copy
is renamed to ``out``: the source dataset is not changed, and ``out`` appears whole or not at all.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import pyarrow as pa

from vlkit.data.columns import replace_columns
from vlkit.data.store import open_dataset, retry_on_conflict, write_lock
from vlkit.errors import VlkitError

ORIGINAL = "original"

SOURCES = "caption_sources"
SCORES = "caption_scores"
DROPPED = "captions_dropped"


@dataclass
class WriteOutcome:
    """Where the captions went.

    Attributes:
        path: the dataset written.
        version_before: its version before the commit (of the source dataset with ``--out``).
        version: its version after.
        copied: a new dataset was made (``--out``).
    """

    path: Path
    version_before: int
    version: int
    copied: bool


def check_out(dataset: str | Path, out: str | Path | None) -> None:
    """Refuse an ``out`` that exists, lies inside the dataset, or has no parent folder (before any work).

    Raises:
        VlkitError: one line saying why.
    """
    if out is None:
        return
    dataset, out = Path(dataset).resolve(), Path(out).resolve()
    if out.exists() or out.is_symlink():
        raise VlkitError(f"{out}: already exists; CapFilt writes a new dataset there and never replaces one "
                         "(choose a new --out, or leave --out out to add a version to the dataset)")
    if out == dataset or dataset in out.parents:
        raise VlkitError(f"{out}: --out must not lie inside the source dataset {dataset}")
    if not out.parent.is_dir():
        raise VlkitError(f"{out.parent}: no such folder for --out")


#: per image id, its texts as ``(text, source, score, kept)``
Decisions = Mapping[str, Sequence[tuple[str, str, float, bool]]]


def _table(ds, decisions: Decisions, meta: dict) -> pa.Table:
    """``id`` and the four caption columns for every row of ``ds`` (rows not filtered keep their captions)."""
    columns = ["id", "captions"] + [c for c in (SOURCES, DROPPED) if c in ds.schema.names]
    rows = ds.to_table(columns=columns).to_pylist()
    ids, captions, sources, scores, dropped = [], [], [], [], []
    for row in rows:
        before = row["captions"] or []
        recorded = row.get(SOURCES) or []
        known = dict(zip(before, recorded)) if len(recorded) == len(before) else {}
        texts = decisions.get(row["id"])
        ids.append(row["id"])
        if texts is None:
            captions.append(before)
            sources.append([known.get(t, ORIGINAL) for t in before])
            scores.append(None)
            dropped.append(row.get(DROPPED) or [])
            continue
        kept = [(text, source, score) for text, source, score, keep in texts if keep]
        captions.append([text for text, _, _ in kept])
        sources.append([known.get(text, source) if source == ORIGINAL else source for text, source, _ in kept])
        scores.append([round(float(score), 6) for _, _, score in kept])
        dropped.append([text for text, _, _, keep in texts if not keep])
    meta = {b"vlkit.capfilt": json.dumps(meta).encode()}
    schema = pa.schema([pa.field("id", pa.string()), pa.field("captions", pa.list_(pa.string())),
                        pa.field(SOURCES, pa.list_(pa.string()), metadata=meta),
                        pa.field(SCORES, pa.list_(pa.float32()), metadata=meta),
                        pa.field(DROPPED, pa.list_(pa.string()), metadata=meta)])
    return pa.Table.from_arrays([pa.array(ids, pa.string()), pa.array(captions, pa.list_(pa.string())),
                                 pa.array(sources, pa.list_(pa.string())), pa.array(scores, pa.list_(pa.float32())),
                                 pa.array(dropped, pa.list_(pa.string()))], schema=schema)


def _copy_dataset(src: Path, dst: Path) -> None:
    """Copy a Lance dataset directory; data files (never modified once written) are hard-linked if possible."""
    for path in sorted(src.rglob("*")):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.relative_to(src).parts[0] == "data":
            try:
                os.link(path, target)
                continue
            except OSError:
                pass
        shutil.copy2(path, target)


def write_capfilt(dataset: str | Path, decisions: Decisions, meta: dict, out: str | Path | None = None) -> WriteOutcome:
    """Write the kept captions into ``dataset`` as a new version, or into a new dataset ``out``.

    Args:
        dataset: the source dataset.
        decisions: per image id, its texts as ``(text, source, score, kept)``; other rows keep their captions.
        meta: JSON-ready facts stored in the new columns' field metadata (the model, the threshold).
        out: a new dataset to write instead of a new version of ``dataset``.

    Raises:
        VlkitError: ``out`` exists or is inside the dataset.
        DataError: the dataset is missing or damaged, or other writers kept committing.
    """
    dataset = Path(dataset)
    check_out(dataset, out)

    def waiting() -> None:
        print(f"waiting for another process writing to {dataset} ...", file=sys.stderr, flush=True)

    if out is None:
        with write_lock(dataset, on_wait=waiting):
            ds = open_dataset(dataset)
            before = ds.version
            new = retry_on_conflict(lambda current: replace_columns(current, _table(current, decisions, meta)), dataset,
                                    "the captions were written", dataset=ds)
        return WriteOutcome(dataset, before, new.version, copied=False)
    out = Path(out)
    temp = out.parent / f".{out.name}.capfilt-{uuid.uuid4().hex[:8]}"
    try:
        with write_lock(dataset, on_wait=waiting):  # no commit to the source while it is copied
            before = open_dataset(dataset).version
            _copy_dataset(dataset, temp)
        ds = open_dataset(temp)
        new = replace_columns(ds, _table(ds, decisions, meta))
        version = new.version
        if out.exists():
            raise VlkitError(f"{out}: appeared while CapFilt was writing; the new dataset is left at {temp}")
        os.replace(temp, out)
    except BaseException:
        if temp.exists() and not out.exists():
            shutil.rmtree(temp, ignore_errors=True)
        raise
    return WriteOutcome(out, before, version, copied=True)


__all__ = ["DROPPED", "SCORES", "SOURCES", "WriteOutcome", "check_out", "write_capfilt"]
