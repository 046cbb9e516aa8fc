"""Raw image-text data into a Lance dataset: read, check, split, and write atomically.

The write is one Lance commit per ingest (plus index refreshes): a process killed part-way leaves the
dataset at its previous version. Images already stored (by ``id``) are not read again, so re-running the
same ingest changes nothing. Ingests into one dataset take turns on its write lock, from reading the ids
already stored to the commit, so concurrent ingests of the same images never store an id twice.

Image files are read only inside their images root (or the source's folder), only when regular files, up to
a byte limit, and only when their header declares no more pixels than :mod:`vlkit.data.decode` allows.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import lance
import pyarrow as pa
from tqdm import tqdm

from vlkit.data.classes import assign_classes, classes_from_rows
from vlkit.data.images import DEFAULT_MAX_IMAGE_BYTES, ImageInfo, ImageProblem
from vlkit.data.ingest_images import CheckedImage, decoded as decode_images, keep_checked
from vlkit.data.ingest_report import IngestReport, log_path, report_path, save_report
from vlkit.data.readers import read_source
from vlkit.data.records import Problem, Record
from vlkit.data.ingest_videos import video_columns
from vlkit.data.schema import (CORE_NAMES, PAIR_FIELDS, PAIR_NAMES, VIDEO_FIELDS, VIDEO_NAMES, build_schema,
                               class_names, extra_field, rows_to_table)
from vlkit.data.video import is_video_path
from vlkit.data.store import is_commit_conflict, open_dataset, retry_on_conflict, write_lock
from vlkit.errors import DataError

SPLITS = ("train", "val", "test")
__all__ = ["IngestReport", "ingest", "log_path", "report_path", "save_report"]


def hash_split(key: str, val_fraction: float, test_fraction: float) -> str:
    """A split from a hash of the id: stable across runs, machines and orderings."""
    u = int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def auto_fragment_rows(n: int) -> int:
    """Rows per fragment that cut ``n`` rows into about 16 equal fragments (16 to 1024 rows each)."""
    return min(1024, max(16, -(-n // 16)))


def collect_records(
    sources: Sequence[Path], fmt: str, images_root: Path | None, problems: list[Problem],
    columns: dict[str, str | None] | None = None,
) -> list[Record]:
    """Read every source; records of the same image (same id) are merged into one.

    ``columns`` (``image_column``, ``text_column``, ``id_column``) go to the Parquet and HF dataset readers.
    """
    merged: dict[str, Record] = {}
    for source in sources:
        for rec in read_source(Path(source), fmt, images_root, problems, **(columns or {})):
            if rec.id in merged:
                merged[rec.id].merge(rec)
            else:
                merged[rec.id] = rec
    usable = []
    for rec in merged.values():
        # a source field named like a core column (e.g. "source", "width") is kept as "extra_<name>"
        rec.extra = {f"extra_{k}" if k in CORE_NAMES or k in PAIR_NAMES or k in VIDEO_NAMES else k: v
                     for k, v in rec.extra.items()}
        if not rec.captions and not rec.questions and rec.label is None and rec.class_name is None:
            problems.append(Problem(rec.source, None, f"image '{rec.id}' has no captions, questions or label"))
        else:
            usable.append(rec)
    return usable


def _extra_fields(records: list[Record]) -> list[pa.Field]:
    keys: dict[str, None] = {}
    for rec in records:
        keys.update(dict.fromkeys(rec.extra))
    pairs = PAIR_FIELDS if any(r.image2_path is not None for r in records) else []  # rows of two images
    videos = VIDEO_FIELDS if any(r.image_data is None and is_video_path(r.image_path) for r in records) else []
    return pairs + videos + [extra_field(k, [r.extra.get(k) for r in records]) for k in keys if k not in CORE_NAMES]


def _row(rec: Record, image) -> dict:
    return {
        "id": rec.id,
        "image": image.data,
        "width": image.width,
        "height": image.height,
        "format": image.format,
        "captions": rec.captions,
        "label": rec.label,
        "class_name": rec.class_name,
        "questions": rec.questions,
        "answers": rec.answers,
        "split": rec.split,
        "source": str(rec.image_path),
        **{k: v for k, v in rec.extra.items() if k not in CORE_NAMES},  # a core column is never overwritten
        **({"image2": image.second.data, "width2": image.second.width, "height2": image.second.height,
            "source2": str(rec.image2_path)} if image.second is not None else {}),
        **video_columns(image),  # a video's file and what it holds (its middle frame is the image)
    }


def image_problem(rec: Record, exc: ImageProblem) -> Problem:
    return Problem(str(rec.image_path), None, f"{exc} (listed at {rec.source})")


def checked_batches(found: Iterable[tuple[Record, object]], schema: pa.Schema, fragment_rows: int,
                    problems: list[Problem]) -> Iterator[pa.RecordBatch]:
    """Rows of ``schema`` from read images, ``fragment_rows`` at a time; an unreadable image becomes a problem.

    The one place where records and their images turn into stored rows, for every engine: the local one calls
    it over all records, a Ray worker over its share.

    Args:
        found: ``(record, ImageInfo or ImageProblem)`` pairs, as :func:`vlkit.data.ingest_images.decoded`
            gives them.
        schema: the dataset's schema.
        fragment_rows: rows gathered before they are handed on.
        problems: where the image problems are reported.
    """
    rows: list[dict] = []
    for rec, image in found:
        if isinstance(image, ImageProblem):
            problems.append(image_problem(rec, image))
            continue
        rows.append(_row(rec, image))
        if len(rows) == fragment_rows:
            yield from rows_to_table(rows, schema).to_batches()
            rows = []
    if rows:
        yield from rows_to_table(rows, schema).to_batches()


def ingest(
    sources: Sequence[str | Path],
    out: str | Path,
    *,
    fmt: str = "auto",
    images_root: str | Path | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    split: str | None = None,
    strict: bool = False,
    fragment_rows: int | None = None,
    workers: int | None = None,
    progress: bool = True,
    allow_outside_root: bool = False,
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    image_column: str | None = None,
    text_column: str | None = None,
    id_column: str | None = None,
    engine: str = "local",
    ray_workers: int | None = None,
    ray_address: str | None = None,
) -> IngestReport:
    """Ingest image-text sources into the Lance dataset at ``out`` (created, or appended to).

    Args:
        sources: files or folders, each in a format ``vlkit ingest`` reads.
        out: the dataset directory (``*.lance``).
        fmt: reader name, or ``auto`` to detect each source's format.
        images_root: folder the sources' image paths are relative to (default: beside each source).
        val_fraction: share of images put in ``val`` when the source gives no split.
        test_fraction: share of images put in ``test`` when the source gives no split.
        split: put every new image in this split, whatever the source says.
        strict: refuse the whole ingest, writing nothing, if any problem is found.
        fragment_rows: rows per Lance fragment (default: about 16 equal fragments, 16 to 1024 rows each).
        workers: threads decoding images (default: CPU count).
        progress: show a progress bar.
        allow_outside_root: read images outside the images root (or the source's folder) too.
        max_image_bytes: the largest image file read; a larger one is a problem.
        image_column: Parquet / HF dataset column holding the image (default: ``image``, else ``jpg``).
        text_column: Parquet / HF dataset column holding the caption(s) (default: ``caption``, else ``text``).
        id_column: Parquet column holding the id (default: ``key``, else ``id``, else the row number).
        engine: ``local`` (threads of this process) or ``ray``: Ray workers read, check and write the fragments,
            and this process commits them once (see :mod:`vlkit.data.ray_ingest`).
        ray_workers: with ``ray``, the workers at once (default: the cluster's CPUs); ``workers`` is then the
            reading threads of each.
        ray_address: with ``ray``, the cluster to join (default: ``RAY_ADDRESS``, else a local runtime).

    Returns:
        The report, also written beside the dataset.

    Raises:
        DataError: unreadable sources, a damaged dataset, nothing to ingest, or any problem under ``strict``.
    """
    started = time.perf_counter()
    out = Path(out)
    images_root = Path(images_root) if images_root is not None else None
    if not 0 <= val_fraction + test_fraction < 1 or val_fraction < 0 or test_fraction < 0:
        raise DataError("--val-fraction and --test-fraction must be >= 0 and add up to less than 1")
    if fragment_rows is not None and fragment_rows < 1:
        raise DataError("--fragment-rows must be at least 1")
    if max_image_bytes < 1:
        raise DataError("--max-image-bytes must be at least 1")
    if engine not in ("local", "ray"):
        raise DataError(f"--engine must be 'local' or 'ray', not {engine!r}")
    if ray_workers is not None and ray_workers < 1:
        raise DataError("--ray-workers must be at least 1")
    with contextlib.ExitStack() as stack:
        ray_engine = None
        if engine == "ray":  # connected before the sources are read: a missing Ray fails first
            from vlkit.data.ray_ingest import RayIngest

            ray_engine = stack.enter_context(RayIngest.session(
                ray_address, ray_workers, threads=workers or 1, confine=not allow_outside_root,
                max_bytes=max_image_bytes))
        report = IngestReport(dataset=str(out), sources=[str(s) for s in sources],
                              started_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        columns = dict(image_column=image_column, text_column=text_column, id_column=id_column)
        records = collect_records([Path(s) for s in sources], fmt, images_root, report.problems, columns)
        report.records = len(records)

        def waiting() -> None:
            print(f"waiting for another process writing to {out} ...", file=sys.stderr, flush=True)

        with write_lock(out, on_wait=waiting):
            options = dict(split=split, val_fraction=val_fraction, test_fraction=test_fraction, strict=strict,
                           fragment_rows=fragment_rows, workers=workers or os.cpu_count() or 1, progress=progress,
                           confine=not allow_outside_root, max_bytes=max_image_bytes, engine=ray_engine)
            ds = _ingest_locked(records, out, report, **options)
            report.version_after = ds.version if ds is not None else None
            report.seconds = time.perf_counter() - started
            save_report(report, out)
    if ds is None:
        raise DataError(f"no usable images in {', '.join(map(str, sources))}; nothing written\n"
                        + report.summary())
    return report


def _ingest_locked(records: list[Record], out: Path, report: IngestReport, *, split: str | None,
                   val_fraction: float, test_fraction: float, strict: bool, fragment_rows: int | None,
                   workers: int, progress: bool, confine: bool, max_bytes: int,
                   engine=None) -> lance.LanceDataset | None:
    """The part of :func:`ingest` done under the dataset's write lock: read the stored ids, write, index.

    The dataset is opened once; each later step builds on the dataset its previous commit returned. With
    ``engine`` (a :class:`vlkit.data.ray_ingest.RayIngest`) its workers check and write the images, and the
    fragments they wrote are committed here, once.
    """
    existing = open_dataset(out) if out.exists() else None
    old_classes: list[str] = []
    known_classes: list[str] = []
    stored_labels: list[int] = []
    if existing is not None:
        report.version_before = existing.version
        old_classes = class_names(existing.schema)
        columns = ["id", "label"] if old_classes else ["id", "label", "class_name"]
        table = existing.to_table(columns=columns)
        stored = set(table.column("id").to_pylist())
        label_values = table.column("label").to_pylist()
        stored_labels = [x for x in label_values if x is not None]
        # a dataset without a stored class list (made by hand) has its classes in its rows
        known_classes = old_classes or classes_from_rows(label_values, table.column("class_name").to_pylist())
        report.rows_existing = sum(r.id in stored for r in records)
        records = [r for r in records if r.id not in stored]
    for rec in records:
        rec.split = split or rec.split or hash_split(rec.id, val_fraction, test_fraction)

    records, classes = assign_classes(records, known_classes, report.problems, report.notices, stored_labels)
    fragment_rows = fragment_rows or auto_fragment_rows(len(records))
    decoded = functools.partial(decode_images, workers=workers, chunk=max(32, workers * 8), confine=confine,
                                max_bytes=max_bytes)
    if engine is None:
        checked = _refuse_on_problems(decoded(records), report, out) if strict else None
    elif strict:
        report.problems.extend(engine.check(records))
        _refuse_on_problems(iter(()), report, out)
    if existing is not None:
        existing = _add_extra_columns(out, existing, _extra_fields(records))
        schema = existing.schema
    else:
        meta = {"vlkit.classes": json.dumps(classes)} if classes else {}
        schema = build_schema(_extra_fields(records), meta)

    if engine is not None:
        ds = engine.write(records, out, schema, existing, fragment_rows, report) or existing
    else:
        bar = tqdm(total=len(records), unit="rows", desc="ingest", disable=not progress, dynamic_ncols=True)

        def batches() -> Iterator[pa.RecordBatch]:
            for batch in checked_batches(_counted(decoded(records, checked=checked), bar), schema, fragment_rows,
                                         report.problems):
                yield batch
                report.rows_added += batch.num_rows

        try:
            ds = _write(out, schema, batches(), existing, fragment_rows) or existing
        finally:
            bar.close()
    if ds is not None and report.rows_added:
        if classes != old_classes and existing is not None:
            ds = retry_on_conflict(_set_classes(classes), out, "the class names were saved", dataset=ds)
        for column, kind in (("id", "BTREE"), ("split", "BITMAP")):
            ds = retry_on_conflict(_index(column, kind), out, f"the {column} index was refreshed", dataset=ds)
    return ds


def _counted(items: Iterator, bar: tqdm) -> Iterator:
    for item in items:
        bar.update(1)
        yield item


def _set_classes(classes: list[str]) -> Callable[[lance.LanceDataset], lance.LanceDataset]:
    def action(ds: lance.LanceDataset) -> lance.LanceDataset:
        ds.update_schema_metadata({"vlkit.classes": json.dumps(classes)})  # commits; ``ds`` moves to it
        return ds

    return action


def _index(column: str, kind: str) -> Callable[[lance.LanceDataset], lance.LanceDataset]:
    def action(ds: lance.LanceDataset) -> lance.LanceDataset:
        ds.create_scalar_index(column, kind, replace=True)  # commits; ``ds`` moves to it
        return ds

    return action


def _add_extra_columns(out: Path, existing: lance.LanceDataset, fields: list[pa.Field]) -> lance.LanceDataset:
    """Add the extra columns the stored rows lack (nulls for them); retried if another process commits first."""
    if not [f for f in fields if f.name not in existing.schema.names]:
        return existing

    def add(ds: lance.LanceDataset) -> lance.LanceDataset:
        new = [f for f in fields if f.name not in ds.schema.names]
        if new:
            ds.add_columns(new)  # commits; ``ds`` moves to it
        return ds

    return retry_on_conflict(add, out, "new columns were added", dataset=existing)


def _refuse_on_problems(decoded: Iterator[tuple[Record, object]], report: IngestReport,
                        out: Path) -> list[ImageInfo | CheckedImage | None]:
    """Check every image (``--strict``); raise if anything is wrong, else return what the check found."""
    found = keep_checked(decoded, report.problems, image_problem)
    if report.problems:
        save_report(report, out)
        raise DataError(
            f"--strict: {len(report.problems)} problems found, nothing written "
            f"(report: {report_path(out)})\n" + report.summary()
        )
    return found


def _write(out: Path, schema: pa.Schema, batches: Iterator[pa.RecordBatch], existing,
           fragment_rows: int) -> lance.LanceDataset | None:
    """Stream ``batches`` into one Lance commit (create or append); commit nothing if there are none.

    Returns:
        The dataset at the version committed, or None when nothing was.
    """
    peek = _Peekable(iter(batches))
    if peek.empty():
        return None
    try:
        return lance.write_dataset(
            peek.reader(schema),
            existing if existing is not None else str(out),
            schema=schema,
            mode="create" if existing is None else "append",
            max_rows_per_file=fragment_rows,
            max_rows_per_group=min(fragment_rows, 1024),
        )
    except (OSError, ValueError, RuntimeError) as exc:
        if not is_commit_conflict(exc):
            raise
        raise DataError(f"{out}: another process changed the dataset during this ingest, so nothing was added; "
                        "run the ingest again (images already stored are skipped)") from None


class _Peekable:
    """Lets the writer skip an empty stream (so nothing is committed) without reading it all first."""

    def __init__(self, it: Iterator[pa.RecordBatch]):
        self._it = it
        self._first = next(self._it, None)

    def empty(self) -> bool:
        return self._first is None

    def reader(self, schema: pa.Schema) -> pa.RecordBatchReader:
        def gen():
            yield self._first
            yield from self._it

        return pa.RecordBatchReader.from_batches(schema, gen())
