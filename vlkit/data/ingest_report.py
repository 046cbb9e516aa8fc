"""What an ingest did, printed and saved beside the dataset.

``<name>.ingest-report.json`` holds the report of the latest ingest; ``<name>.ingest-log.jsonl`` gains one
line per ingest, so the report of every run survives, however many processes ingest into the dataset. Both
are written while the dataset's write lock is held.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vlkit.data.records import Problem
from vlkit.utils.fs import atomic_write


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
    notices: list[Problem] = field(default_factory=list)  # kept as given, but worth knowing
    seconds: float = 0.0
    started_at: str = ""
    pid: int = field(default_factory=os.getpid)

    @property
    def rows_per_second(self) -> float:
        return self.rows_added / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["problems"] = [asdict(p) for p in self.problems]
        out["notices"] = [asdict(p) for p in self.notices]
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
        if self.notices:
            lines.append(f"kept, but note ({len(self.notices)}):")
            lines += [f"  {p}" for p in self.notices[:max_problems]]
            if len(self.notices) > max_problems:
                lines.append(f"  ... and {len(self.notices) - max_problems} more (see the report file)")
        return "\n".join(lines)


def report_path(dataset: Path) -> Path:
    """Where the report of the latest ingest into ``dataset`` is written: ``<name>.ingest-report.json``."""
    return dataset.parent / f"{dataset.stem}.ingest-report.json"


def log_path(dataset: Path) -> Path:
    """Where every ingest into ``dataset`` adds its report as one JSON line: ``<name>.ingest-log.jsonl``."""
    return dataset.parent / f"{dataset.stem}.ingest-log.jsonl"


def save_report(report: IngestReport, out: Path) -> Path:
    """Write the report beside the dataset (temporary file, then rename) and add it to the log.

    The caller holds the dataset's write lock, so reports of concurrent ingests neither interleave nor
    replace one another in the log.
    """
    path = report_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(report.to_dict(), indent=2))
    with open(log_path(out), "a", encoding="utf-8") as fh:
        fh.write(json.dumps(report.to_dict()) + "\n")
    return path


def read_log(dataset: Path) -> list[dict]:
    """Every report in the ingest log of ``dataset``, oldest first (empty if there is none)."""
    path = log_path(dataset)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
