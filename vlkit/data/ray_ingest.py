"""``vlkit ingest --engine ray``: Ray workers read, check and write fragments; the driver commits them once.

The Ray engine is another driver of the same ingest, not a second copy of it. :func:`vlkit.data.ingest.ingest`
reads the sources, takes the write lock, skips the ids already stored, assigns splits and classes and builds
the schema as it always does; then, instead of reading the images on threads of its own process, it hands the
records to :class:`RayIngest`:

- the records are cut into chunks of ``fragment_rows``, and a Ray Data task per chunk reads and checks its
  images (:func:`vlkit.data.ingest_images.decoded`), turns them into rows
  (:func:`vlkit.data.ingest.checked_batches`) and writes them as uncommitted Lance fragments
  (:func:`lance.fragment.write_fragments`);
- the driver gathers the fragments in chunk order (so the rows come out in the order the local engine writes
  them) and commits them in one ``Overwrite`` (a new dataset) or ``Append``, still under the write lock.

A worker that fails commits nothing: its error is one line naming the dataset, the fragments the other workers
wrote are deleted, and the dataset stays at its previous version. ``--strict`` runs a checking pass on the
workers first and writes only when it found no problem.

Workers need vlkit installed and the sources and the dataset at the same paths (a shared file system, or object
storage for the dataset).
"""

from __future__ import annotations

import contextlib
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import lance
import pyarrow as pa

from vlkit.data.images import ImageProblem
from vlkit.data.records import Problem, Record
from vlkit.data.store import is_commit_conflict
from vlkit.errors import DataError


MAX_RETRIES = 2
"""Times a chunk whose worker was lost is run again."""


@dataclass
class ChunkResult:
    """What one Ray task reports for its chunk of records.

    Attributes:
        chunk: the chunk's position among all chunks.
        fragments: the fragments it wrote, uncommitted (``FragmentMetadata.to_json()`` dicts).
        problems: its images' problems, in record order.
        rows: the rows it wrote.
        error: why it failed, or ``""``.
    """

    chunk: int
    fragments: list[dict] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    rows: int = 0
    error: str = ""


def _chunk_task(batch: dict[str, Any], *, out: str, schema: pa.Schema | None, fragment_rows: int, threads: int,
                confine: bool, max_bytes: int, max_pixels: int) -> dict[str, list]:
    """The Ray Data task of one chunk: read and check its images and, given a ``schema``, write its fragments.

    Runs on a Ray worker; any exception is returned as the chunk's ``error`` so that the driver learns which
    fragments the other chunks wrote.
    """
    from vlkit.data.decode import set_max_pixels
    from vlkit.data.ingest import checked_batches, image_problem
    from vlkit.data.ingest_images import decoded

    result = ChunkResult(int(batch["chunk"][0]))
    try:
        set_max_pixels(max_pixels)  # the driver's limit (--max-pixels), whatever the worker's environment
        records: list[Record] = pickle.loads(batch["records"][0])  # what the driver sent through Ray, not a file
        found = decoded(records, workers=threads, chunk=max(32, threads * 8), confine=confine, max_bytes=max_bytes)
        if schema is None:
            result.problems = [image_problem(rec, image) for rec, image in found if isinstance(image, ImageProblem)]
        else:
            # a chunk is one fragment: its rows are gathered before the write starts, so a record that fails
            # fails the chunk before any file is written
            batches = checked_batches(found, schema, fragment_rows, result.problems)
            first = next(batches, None)
            if first is not None:
                from itertools import chain

                from lance.fragment import write_fragments

                reader = pa.RecordBatchReader.from_batches(schema, chain([first], batches))
                written = write_fragments(reader, out, schema=schema, max_rows_per_file=fragment_rows,
                                          max_rows_per_group=min(fragment_rows, 1024))
                result.fragments = [f.to_json() for f in written]
                result.rows = sum(f.physical_rows for f in written)
    except Exception as exc:  # noqa: BLE001  (reported to the driver, which commits nothing)
        result.error = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    return {"chunk": [result.chunk], "fragments": [json.dumps(result.fragments)],
            "problems": [json.dumps([[p.file, p.row, p.reason] for p in result.problems])],
            "rows": [result.rows], "error": [result.error]}


class RayIngest:
    """The Ray engine of one ingest: runs the chunk tasks on the cluster and commits what they wrote.

    Args:
        ray: the connected ``ray`` module.
        workers: tasks at once (default: the cluster's CPUs).
        threads: image-reading threads in each task.
        confine: read images only inside their records' roots.
        max_bytes: the largest image read.
    """

    def __init__(self, ray: Any, workers: int | None, threads: int, confine: bool, max_bytes: int):
        from vlkit.utils.ray_runtime import cluster_cpus

        self.ray = ray
        self.workers = workers or cluster_cpus(ray)
        self.threads = max(1, threads)
        self.confine = confine
        self.max_bytes = max_bytes

    @classmethod
    @contextlib.contextmanager
    def session(cls, address: str | None, workers: int | None, *, threads: int, confine: bool,
                max_bytes: int) -> Iterator["RayIngest"]:
        """A :class:`RayIngest` on the cluster at ``address`` (see :func:`vlkit.utils.ray_runtime.ray_session`)."""
        from vlkit.utils.ray_runtime import ray_session

        with ray_session(address) as ray:
            yield cls(ray, workers, threads, confine, max_bytes)

    def _run(self, records: Sequence[Record], out: Path, schema: pa.Schema | None,
             fragment_rows: int) -> list[ChunkResult]:
        """One task per ``fragment_rows`` records; their results in chunk order."""
        from ray import cloudpickle

        from vlkit.data.decode import max_pixels
        from vlkit.utils.ray_runtime import failure_line, map_batches, task_pool

        items = [{"chunk": i, "records": cloudpickle.dumps(list(records[start:start + fragment_rows]))}
                 for i, start in enumerate(range(0, len(records), fragment_rows))]
        kwargs = dict(out=str(out.resolve()), schema=schema, fragment_rows=fragment_rows, threads=self.threads,
                      confine=self.confine, max_bytes=self.max_bytes, max_pixels=max_pixels())
        data = self.ray.data.from_items(items, override_num_blocks=len(items))
        try:
            # a worker lost (a node gone) is retried twice; past that (an input that kills its worker every time)
            # the ingest fails rather than retrying for ever, as Ray Data would by default
            rows = map_batches(data, _chunk_task, retries=MAX_RETRIES, batch_size=1, fn_kwargs=kwargs, num_cpus=1,
                               compute=task_pool(self.ray, min(self.workers, len(items)))).take_all()
        except Exception as exc:  # noqa: BLE001  (a worker lost, or Ray itself failing: one line)
            return [ChunkResult(-1, error=failure_line(exc))]
        results = [ChunkResult(int(r["chunk"]), json.loads(r["fragments"]),
                               [Problem(*p) for p in json.loads(r["problems"])], int(r["rows"]), str(r["error"]))
                   for r in rows]
        return sorted(results, key=lambda r: r.chunk)

    def check(self, records: Sequence[Record]) -> list[Problem]:
        """The problems of ``records``' images, read and checked on the workers (``--strict``'s pass)."""
        if not records:
            return []
        results = self._run(records, Path("."), None, fragment_rows=max(1, -(-len(records) // (4 * self.workers))))
        failed = [r.error for r in results if r.error]
        if failed:
            raise DataError(f"a Ray worker failed while checking the images ({failed[0]}); nothing was written")
        return [p for r in results for p in r.problems]

    def write(self, records: Sequence[Record], out: Path, schema: pa.Schema, existing: lance.LanceDataset | None,
              fragment_rows: int, report: Any) -> lance.LanceDataset | None:
        """Write ``records`` as fragments on the workers and commit them once (create or append).

        Adds the images' problems and the rows written to ``report``.

        Returns:
            The dataset at the version committed, or None when no row was written.

        Raises:
            DataError: a worker failed, or another process committed meanwhile; nothing is committed then.
        """
        if not records:
            return None
        results = self._run(records, out, schema, fragment_rows)
        fragments = [f for r in results for f in r.fragments]
        failed = [r.error for r in results if r.error]
        if failed:
            _discard(out, fragments, created=existing is None)
            state = f"stays at version {existing.version}" if existing is not None else "was not created"
            raise DataError(f"{out}: a Ray worker failed ({failed[0]}); nothing was committed, the dataset {state}")
        for r in results:
            report.problems.extend(r.problems)
        if not fragments:
            return None
        from lance.fragment import FragmentMetadata

        metadata = [FragmentMetadata.from_json(json.dumps(f)) for f in fragments]
        try:
            if existing is None:
                if (out / "_versions").exists():  # made meanwhile by a writer that takes no lock
                    raise RuntimeError("commit conflict: the dataset was created meanwhile")
                ds = lance.LanceDataset.commit(str(out), lance.LanceOperation.Overwrite(schema, metadata))
            else:
                ds = lance.LanceDataset.commit(str(out), lance.LanceOperation.Append(metadata),
                                               read_version=existing.version)
        except (OSError, ValueError, RuntimeError) as exc:
            _discard(out, fragments, created=existing is None)
            if not is_commit_conflict(exc):
                raise
            raise DataError(f"{out}: another process changed the dataset during this ingest, so nothing was added; "
                            "run the ingest again (images already stored are skipped)") from None
        report.rows_added += sum(r.rows for r in results)
        return ds


def _discard(out: Path, fragments: list[dict], created: bool) -> None:
    """Delete the data files of uncommitted ``fragments``; when this ingest was creating ``out``, also any data
    file a lost worker left (no other writer had the dataset: it did not exist, and the lock is held) and the
    folders it made, if nothing else is in them: a failed create leaves no half dataset behind."""
    for fragment in fragments:
        for data_file in fragment.get("files", []):
            (out / "data" / data_file["path"]).unlink(missing_ok=True)
    if created and not (out / "_versions").exists():
        for leftover in (out / "data").glob("*.lance") if (out / "data").is_dir() else ():
            leftover.unlink(missing_ok=True)
        for folder in (out / "data", out):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty
