"""Ingest rows/s of the Ray engine with 1 and 2 workers next to the local engine, on the same data.

Each pass ingests the same source into a new dataset; the engines take turns within each repeat, so drift on a
shared machine does not favour one of them, and the best pass of each is reported. The Ray runtime is started
once before the passes (its start-up time is reported apart); every Ray pass still pays for scheduling its
tasks and for the commit. The rows of every pass are checked to be the local engine's rows.

Run: ``python bench/ray_ingest.py [--data ../shared/data/flickr8k-1k] [--repeats 3] [--ray-workers 1 2]``
Prints a markdown table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import lance

from vlkit.data.ingest import ingest

ROOT = Path(__file__).resolve().parent.parent


SETTINGS = {"local": ("local", None, None), "local_1": ("local", None, 1)}
"""Name -> (engine, Ray workers, reading threads per process); the Ray settings are added per worker count."""


def _pass(source: Path, images: Path, out: Path, engine: str, ray_workers: int | None, threads: int | None,
          fragment_rows: int | None) -> tuple[float, list[str]]:
    """Rows/s of one ingest into the new dataset ``out``, and the ids it stored (sorted)."""
    start = time.perf_counter()
    report = ingest([source], out, images_root=images, progress=False, engine=engine, ray_workers=ray_workers,
                    workers=threads, fragment_rows=fragment_rows)
    seconds = time.perf_counter() - start
    ids = sorted(lance.dataset(str(out)).to_table(columns=["id"]).column("id").to_pylist())
    return report.rows_added / seconds, ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "flickr8k-1k"),
                        help="a folder with captions.txt and images/")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ray-workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--fragment-rows", type=int, default=None,
                        help="rows per fragment, and per Ray task (default: vlkit's, about 16 fragments)")
    args = parser.parse_args()
    data = Path(args.data).resolve()
    source, images = data / "captions.txt", data / "images"

    import ray

    start = time.perf_counter()
    ray.init(address="local", num_cpus=max(args.ray_workers), include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)
    ray_start_s = time.perf_counter() - start
    settings = {**SETTINGS, **{f"ray_{w}": ("ray", w, None) for w in args.ray_workers}}
    best: dict[str, float] = {}
    reference: list[str] | None = None
    same = True
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for repeat in range(args.repeats):
                for name, (engine, workers, threads) in settings.items():
                    rps, ids = _pass(source, images, Path(tmp) / f"{name}-{repeat}.lance", engine, workers, threads,
                                     args.fragment_rows)
                    best[name] = max(best.get(name, 0.0), rps)
                    reference = ids if reference is None else reference
                    same = same and ids == reference
    finally:
        ray.shutdown()

    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    rows = len(reference or [])
    chunk = f"{args.fragment_rows} rows" if args.fragment_rows else "vlkit's default size"
    print(f"{data.name} ({rows} images), fragments (Ray tasks) of {chunk}, best of {args.repeats} passes; {machine}\n")
    print("| engine | rows/s | vs local |")
    print("|---|---|---|")
    for name, (engine, workers, threads) in settings.items():
        label = (f"local, {threads or os.cpu_count()} thread{'s' if (threads or os.cpu_count()) > 1 else ''}"
                 if workers is None else f"ray, {workers} worker{'s' if workers > 1 else ''} of 1 thread")
        print(f"| {label} | {best[name]:.0f} | {best[name] / best['local']:.2f}x |")
    print(f"\nRay runtime start (once, not in the passes): {ray_start_s:.1f} s; same rows in every pass: {same}")
    print(json.dumps({"bench": "ray_ingest", "machine": machine, "rows": rows, "repeats": args.repeats,
                      "fragment_rows": args.fragment_rows,
                      "local_rows_per_s": round(best["local"], 1), "local_1_rows_per_s": round(best["local_1"], 1),
                      **{f"ray_{w}_rows_per_s": round(best[f"ray_{w}"], 1) for w in args.ray_workers},
                      "ray_start_s": round(ray_start_s, 2), "same_rows": same}))


if __name__ == "__main__":
    main()
