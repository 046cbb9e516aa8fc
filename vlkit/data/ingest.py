"""Raw image-text data into a Lance dataset: read, check, split, and write atomically.

The write is one Lance commit per ingest (plus index refreshes): a process killed part-way leaves the
dataset at its previous version. Images already stored (by ``id``) are not read again, so re-running the
same ingest changes nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import lance
import pyarrow as pa
from tqdm import tqdm

from vlkit.data.images import ImageProblem, read_image
from vlkit.data.readers import read_source
from vlkit.data.records import Problem, Record
from vlkit.data.schema import CORE_NAMES, build_schema, class_names, extra_field, rows_to_table
from vlkit.errors import DataError

SPLITS = ("train", "val", "test")


@dataclass
class IngestReport:
    """What an ingest did; saved as JSON beside the dataset."""

    dataset: str
    sources: list[str]
    version_before: int | None = None
    version_after: int | None = None
    records: int = 0
    rows_added: int = 0
    rows_existing: int = 0
    problems: list[Problem] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def rows_per_second(self) -> float:
        return self.rows_added / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["problems"] = [asdict(p) for p in self.problems]
        out["rows_per_second"] = round(self.rows_per_second, 1)
        return out

    def summary(self, max_problems: int = 20) -> str:
        lines = [
            f"ingested {self.rows_added} new images into {self.dataset} "
            f"({self.rows_existing} already present, {len(self.problems)} problems) "
            f"in {self.seconds:.1f}s ({self.rows_per_second:.0f} rows/s); "
            f"version {self.version_before} -> {self.version_after}"
        ]
        if self.problems:
            lines.append(f"skipped ({len(self.problems)}):")
            lines += [f"  {p}" for p in self.problems[:max_problems]]
            if len(self.problems) > max_problems:
                lines.append(f"  ... and {len(self.problems) - max_problems} more (see the report file)")
        return "\n".join(lines)


def report_path(dataset: Path) -> Path:
    """Where the ingest report of ``dataset`` is written: ``<name>.ingest-report.json`` beside it."""
    return dataset.parent / f"{dataset.stem}.ingest-report.json"


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
    sources: Sequence[Path], fmt: str, images_root: Path | None, problems: list[Problem]
) -> list[Record]:
    """Read every source; records of the same image (same id) are merged into one."""
    merged: dict[str, Record] = {}
    for source in sources:
        for rec in read_source(Path(source), fmt, images_root, problems):
            if rec.id in merged:
                merged[rec.id].merge(rec)
            else:
                merged[rec.id] = rec
    usable = []
    for rec in merged.values():
        # a source field named like a core column (e.g. "source", "width") is kept as "extra_<name>"
        rec.extra = {f"extra_{k}" if k in CORE_NAMES else k: v for k, v in rec.extra.items()}
        if not rec.captions and not rec.questions and rec.label is None:
            problems.append(Problem(rec.source, None, f"image '{rec.id}' has no captions, questions or label"))
        else:
            usable.append(rec)
    return usable


def _assign_classes(records: list[Record], existing: list[str]) -> list[str]:
    """Give every named class one label, keeping the labels already stored; returns the class list."""
    named = [r for r in records if r.class_name is not None]
    if not named:
        return existing
    classes = list(existing)
    if not classes:
        by_label: dict[int, str] = {}
        consistent = all(r.label is not None and by_label.setdefault(r.label, r.class_name) == r.class_name
                         for r in named)
        if consistent and len(set(by_label.values())) == len(by_label):
            classes = [by_label.get(i, f"class_{i}") for i in range(max(by_label) + 1)]
    index = {name: i for i, name in enumerate(classes)}
    for rec in sorted(named, key=lambda r: r.class_name):
        if rec.class_name not in index:
            index[rec.class_name] = len(classes)
            classes.append(rec.class_name)
        rec.label = index[rec.class_name]
    return classes


def _extra_fields(records: list[Record]) -> list[pa.Field]:
    keys: dict[str, None] = {}
    for rec in records:
        keys.update(dict.fromkeys(rec.extra))
    return [extra_field(k, [r.extra.get(k) for r in records]) for k in keys if k not in CORE_NAMES]


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
    }


def image_problem(rec: Record, exc: ImageProblem) -> Problem:
    return Problem(str(rec.image_path), None, f"{exc} (listed at {rec.source})")


def _checked(rec: Record):
    try:
        return read_image(rec.image_path)
    except ImageProblem as exc:
        return exc


def _decoded(records: list[Record], workers: int, chunk: int) -> Iterator[tuple[Record, object]]:
    """(record, ImageInfo or ImageProblem) in input order, decoding on ``workers`` threads."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, len(records), chunk):
            part = records[start : start + chunk]
            yield from zip(part, pool.map(_checked, part))


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

    Returns:
        The report, also written beside the dataset.

    Raises:
        DataError: unreadable sources, nothing to ingest, or any problem under ``strict``.
    """
    started = time.perf_counter()
    out = Path(out)
    images_root = Path(images_root) if images_root is not None else None
    if not 0 <= val_fraction + test_fraction < 1 or val_fraction < 0 or test_fraction < 0:
        raise DataError("--val-fraction and --test-fraction must be >= 0 and add up to less than 1")
    if fragment_rows is not None and fragment_rows < 1:
        raise DataError("--fragment-rows must be at least 1")
    report = IngestReport(dataset=str(out), sources=[str(s) for s in sources])
    records = collect_records([Path(s) for s in sources], fmt, images_root, report.problems)
    report.records = len(records)

    existing = lance.dataset(str(out)) if out.exists() else None
    if existing is not None:
        report.version_before = existing.version
        stored = set(existing.to_table(columns=["id"]).column("id").to_pylist())
        report.rows_existing = sum(r.id in stored for r in records)
        records = [r for r in records if r.id not in stored]
    for rec in records:
        rec.split = split or rec.split or hash_split(rec.id, val_fraction, test_fraction)

    old_classes = class_names(existing.schema) if existing is not None else []
    classes = _assign_classes(records, old_classes)
    if existing is not None:
        schema = existing.schema
        new_fields = [f for f in _extra_fields(records) if f.name not in schema.names]
        if new_fields:  # a column of nulls for the rows already stored
            existing.add_columns(new_fields)
            existing = lance.dataset(str(out))
            schema = existing.schema
    else:
        meta = {"vlkit.classes": json.dumps(classes)} if classes else {}
        schema = build_schema(_extra_fields(records), meta)

    workers = workers or os.cpu_count() or 1
    fragment_rows = fragment_rows or auto_fragment_rows(len(records))
    if strict:
        _refuse_on_problems(records, workers, report, out)

    bar = tqdm(total=len(records), unit="rows", desc="ingest", disable=not progress, dynamic_ncols=True)

    def batches() -> Iterator[pa.RecordBatch]:
        rows: list[dict] = []
        for rec, image in _decoded(records, workers, chunk=max(32, workers * 8)):
            bar.update(1)
            if isinstance(image, ImageProblem):
                report.problems.append(image_problem(rec, image))
                continue
            rows.append(_row(rec, image))
            if len(rows) == fragment_rows:
                yield from rows_to_table(rows, schema).to_batches()
                report.rows_added += len(rows)
                rows = []
        if rows:
            yield from rows_to_table(rows, schema).to_batches()
            report.rows_added += len(rows)

    try:
        _write(out, schema, batches(), existing, fragment_rows)
    finally:
        bar.close()
    ds = lance.dataset(str(out)) if out.exists() else None
    if ds is not None and report.rows_added:
        if classes != old_classes and existing is not None:
            ds.update_schema_metadata({"vlkit.classes": json.dumps(classes)})
        ds.create_scalar_index("id", "BTREE", replace=True)
        ds.create_scalar_index("split", "BITMAP", replace=True)
        ds = lance.dataset(str(out))
    report.version_after = ds.version if ds is not None else None
    report.seconds = time.perf_counter() - started
    save_report(report, out)
    if ds is None:
        raise DataError(f"no usable images in {', '.join(map(str, sources))}; nothing written\n"
                        + report.summary())
    return report


def _refuse_on_problems(records: list[Record], workers: int, report: IngestReport, out: Path) -> None:
    for rec, image in _decoded(records, workers, chunk=max(32, workers * 8)):
        if isinstance(image, ImageProblem):
            report.problems.append(image_problem(rec, image))
    if report.problems:
        save_report(report, out)
        raise DataError(
            f"--strict: {len(report.problems)} problems found, nothing written "
            f"(report: {report_path(out)})\n" + report.summary()
        )


def _write(out: Path, schema: pa.Schema, batches: Iterator[pa.RecordBatch], existing, fragment_rows: int) -> None:
    """Stream ``batches`` into one Lance commit (create or append); commit nothing if there are none."""
    peek = _Peekable(iter(batches))
    if peek.empty():
        return
    lance.write_dataset(
        peek.reader(schema),
        existing if existing is not None else str(out),
        schema=schema,
        mode="create" if existing is None else "append",
        max_rows_per_file=fragment_rows,
        max_rows_per_group=min(fragment_rows, 1024),
    )


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


def save_report(report: IngestReport, out: Path) -> Path:
    """Write the report JSON beside the dataset (temporary file, then rename)."""
    path = report_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report.to_dict(), indent=2))
    os.replace(tmp, path)
    return path
