"""Run every benchmark in ``bench/`` and collect their figures in one table.

Writes ``bench/results.md`` (figure | vlkit | reference | ratio | machine) and ``bench/results.json`` (each
benchmark's JSON line, its status and the rows).

Benchmarks are the ``bench/*.py`` scripts other than this one and the ``_*.py`` helpers; each runs in its own
subprocess and its result is the last stdout line that starts with ``{``. Benchmarks named ``gpu_*`` (or listed
as needing CUDA) are skipped on a machine without CUDA, with a ``skipped: no CUDA`` row.

Run:
    ``python bench/run_all.py``                          every benchmark, default settings (an hour or more)
    ``python bench/run_all.py --quick``                  each with its smallest settings
    ``python bench/run_all.py --only gpu_train gpu_input --merge``   rerun some, keep the others' results
    ``python bench/run_all.py --from-json bench/results.json other.log``   rebuild the table, run nothing
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import last_json_line  # noqa: E402
from _results import ADAPTERS, Row, markdown_table, row, rows_for  # noqa: E402

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent


@dataclass(frozen=True)
class Spec:
    """How ``run_all`` runs one benchmark.

    Attributes:
        needs_cuda: skipped on a machine without CUDA.
        quick: arguments of the smallest meaningful run (``--quick``).
        full: arguments of the default run.
    """

    needs_cuda: bool = False
    quick: tuple[str, ...] = ()
    full: tuple[str, ...] = ()


SPECS: dict[str, Spec] = {
    "data_loading": Spec(quick=("--repeats", "1", "--sizes", "224")),
    "train_step": Spec(quick=("--steps", "1", "--precisions", "bf16", "--texts", "captions")),
    "search": Spec(quick=("--sizes", "10000", "--real", "1000", "--queries", "50",
                          "--methods", "exact", "ivf_pq", "ivf_sq")),
    "quality_flickr8k": Spec(quick=("--epochs", "2")),
    "caption_quality": Spec(quick=("--baselines-only",)),
    "generate_speed": Spec(quick=("--batches", "1", "--threads", "1")),
    "gpu_train": Spec(needs_cuda=True, quick=("--steps", "10", "--warmup", "5", "--reference", "open_clip"),
                      full=("--reference", "open_clip", "--find-max-batch")),
    "gpu_input": Spec(needs_cuda=True, quick=("--workers", "0", "4", "--limit", "512", "--repeats", "1")),
}


def spec_for(name: str) -> Spec:
    """The benchmark's spec; an unlisted one runs without arguments and needs CUDA if named ``gpu_*``."""
    return SPECS.get(name, Spec(needs_cuda=name.startswith("gpu_")))


def discover(bench_dir: Path = BENCH) -> list[str]:
    """Names of the benchmark scripts in ``bench_dir``, sorted."""
    return sorted(p.stem for p in bench_dir.glob("*.py") if p.name != "run_all.py" and not p.name.startswith("_"))


def cuda_available() -> bool:
    """Whether torch sees a CUDA device here."""
    import torch

    return torch.cuda.is_available()


@dataclass
class Outcome:
    """What running one benchmark gave: ``ok``, ``skipped: ...`` or ``failed: ...``, and its JSON line."""

    name: str
    status: str
    result: dict[str, Any] | None = None
    seconds: float = 0.0


def run_benchmark(name: str, args: list[str], timeout: float | None = None, echo: bool = True) -> Outcome:
    """Run ``bench/NAME.py ARGS`` in a subprocess (stderr passes through), echoing its stdout line by line.

    Returns:
        ``ok`` with its JSON line, or ``failed: ...`` (non-zero exit, timeout, or no JSON line).
    """
    cmd = [sys.executable, str(BENCH / f"{name}.py"), *args]
    if echo:
        print(f"== {name}: {shlex.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True, bufsize=1)
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        proc.kill()

    killer = threading.Timer(timeout, kill) if timeout else None
    if killer:
        killer.start()
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if echo:
            print(f"[{name}] {line}", end="", flush=True)
    code = proc.wait()
    if killer:
        killer.cancel()
    seconds = time.perf_counter() - start
    result = last_json_line("".join(lines))
    if timed_out.is_set():
        return Outcome(name, f"failed: timed out after {timeout:.0f} s", None, seconds)
    if code != 0:
        return Outcome(name, f"failed: exit code {code}", None, seconds)
    if result is None:
        return Outcome(name, "failed: no JSON line in its output", None, seconds)
    return Outcome(name, "ok", result, seconds)


def load_results(paths: list[Path]) -> dict[str, dict[str, Any]]:
    """Benchmark results from saved files, keyed by their ``bench`` name (later ones win).

    A file is either a ``results.json`` written by this script, or any text whose lines starting with ``{``
    are benchmark JSON lines (benchmark logs, or JSON lines collected by hand).
    """
    results: dict[str, dict[str, Any]] = {}
    for path in paths:
        text = Path(path).read_text()
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None
        if isinstance(whole, dict) and isinstance(whole.get("results"), dict):
            results.update({k: v for k, v in whole["results"].items() if isinstance(v, dict)})
            continue
        if isinstance(whole, dict) and "bench" in whole:
            results[str(whole["bench"])] = whole
            continue
        for line in text.splitlines():
            parsed = last_json_line(line)
            if parsed is not None and "bench" in parsed:
                results[str(parsed["bench"])] = parsed
    return results


def order(names: list[str]) -> list[str]:
    """Known benchmarks in a fixed order, then the others alphabetically."""
    known = [n for n in ADAPTERS if n in names]
    return known + sorted(n for n in names if n not in ADAPTERS)


def this_machine() -> str:
    """A short description of this machine, for rows of benchmarks that did not run."""
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def build_rows(results: dict[str, dict[str, Any]], status: dict[str, str]) -> list[Row]:
    """Rows of every result, and one row for each benchmark that was skipped or failed."""
    rows: list[Row] = []
    for name in order(sorted(set(results) | set(status))):
        if name in results:
            rows.extend(rows_for(results[name]))
        elif status.get(name, "ok") != "ok":
            rows.append(row(name, "(whole benchmark)", status[name], machine=this_machine()))
    return rows


def write_outputs(rows: list[Row], results: dict[str, dict[str, Any]], status: dict[str, str], md: Path,
                  out_json: Path, note: str) -> None:
    """Write the markdown table and the JSON file."""
    stamp = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    md.parent.mkdir(parents=True, exist_ok=True)
    lines = ["# vlkit benchmark results", "", f"Generated {stamp} by `bench/run_all.py` ({note}). Ratios are "
             "vlkit / reference unless the figure says otherwise; see each `bench/*.py` for what it measures.",
             "", markdown_table(rows), ""]
    failed = {k: v for k, v in status.items() if v.startswith("failed")}
    if failed:
        lines += ["Failed: " + "; ".join(f"{k} ({v})" for k, v in failed.items()), ""]
    md.write_text("\n".join(lines))
    out_json.write_text(json.dumps({"generated": stamp, "note": note, "status": status, "results": results,
                                    "rows": [asdict(r) for r in rows]}, indent=1) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line settings (see ``--help``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these benchmarks")
    parser.add_argument("--skip", nargs="+", metavar="NAME", default=[], help="do not run these")
    parser.add_argument("--quick", action="store_true", help="each benchmark's smallest settings")
    parser.add_argument("--args", action="append", default=[], metavar="NAME=ARGS",
                        help="extra arguments for one benchmark, e.g. gpu_train='--batch 512'")
    parser.add_argument("--merge", action="store_true", help="keep the results in --out-json of benchmarks not run")
    parser.add_argument("--from-json", nargs="+", type=Path, metavar="FILE",
                        help="rebuild the table from saved results / JSON lines; run nothing")
    parser.add_argument("--timeout", type=float, default=None, help="seconds allowed per benchmark")
    parser.add_argument("--out-md", type=Path, default=BENCH / "results.md")
    parser.add_argument("--out-json", type=Path, default=BENCH / "results.json")
    parser.add_argument("--quiet", action="store_true", help="do not echo the benchmarks' output")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[Row]:
    """Run (or, with ``--from-json``, reload) the benchmarks, write both outputs, print the table; returns the rows."""
    args = parse_args(argv)
    if args.from_json:
        results = load_results(args.from_json)
        status = {name: "ok" for name in results}
        rows = build_rows(results, status)
        write_outputs(rows, results, status, args.out_md, args.out_json,
                      "from saved results: " + ", ".join(str(p) for p in args.from_json))
        print(markdown_table(rows))
        return rows

    available = discover()
    unknown = sorted((set(args.only or []) | set(args.skip)) - set(available))
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; benchmarks are {available}")
    extra: dict[str, list[str]] = {}
    for item in args.args:
        name, _, text = item.partition("=")
        extra.setdefault(name, []).extend(shlex.split(text))
    names = [n for n in available if (not args.only or n in args.only) and n not in args.skip]
    has_cuda = cuda_available() if any(spec_for(n).needs_cuda for n in names) else False

    results: dict[str, dict[str, Any]] = {}
    status: dict[str, str] = {}
    if args.merge and args.out_json.exists():
        saved = json.loads(args.out_json.read_text())
        results.update({k: v for k, v in saved.get("results", {}).items() if k not in names})
        status.update({k: v for k, v in saved.get("status", {}).items() if k not in names})
    for name in names:
        spec = spec_for(name)
        if spec.needs_cuda and not has_cuda:
            status[name] = "skipped: no CUDA"
            continue
        outcome = run_benchmark(name, [*(spec.quick if args.quick else spec.full), *extra.get(name, [])],
                                args.timeout, echo=not args.quiet)
        status[name] = outcome.status
        if outcome.result is not None:
            results[name] = outcome.result
        print(f"== {name}: {outcome.status} in {outcome.seconds:.0f} s", flush=True)
    rows = build_rows(results, status)
    write_outputs(rows, results, status, args.out_md, args.out_json, "quick settings" if args.quick else
                  "default settings")
    print(markdown_table(rows))
    return rows


if __name__ == "__main__":
    main()
