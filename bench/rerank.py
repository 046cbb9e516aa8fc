"""ITM re-ranking benchmark: retrieval recall of a tiny ALBEF with and without ``--rerank K``, and its cost.

Protocol, all through the command line:

1. ``vlkit data synth --out WORK/synth --n 1000`` (64-px shapes images, four captions each; skipped with
   ``--data``);
2. ``vlkit train albef_vqa_synth`` with the ``itm`` task (ITC + ITM on hard negatives + MLM), ``--epochs``
   epochs, the checkpoint of best validation R-sum kept (skipped with ``--run``);
3. for each split of ``--splits``: ``vlkit eval RUN --task retrieval --json`` and the same with
   ``--rerank K``: recall@1/5 both ways before (the contrastive embeddings) and after re-ranking each query's
   top K by the ITM head, the pairs scored and the seconds taken (the eval's own wall time; re-ranking alone).

The synthetic captions are generic (a third of them are distinct: "a red circle" fits many images), so many
of the hard negatives the ITM head trains on are true matches; its re-ranking is measured, not assumed to help.

Run: ``python bench/rerank.py [--run RUN] [--data DATASET] [--epochs 60] [--k 16] [--splits test val]``
Prints a markdown table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_description, run_vlkit  # noqa: E402

FIGURES = ("t2i_r1", "t2i_r5", "i2t_r1", "i2t_r5", "rsum")
LABELS = {"t2i_r1": "T->I R@1", "t2i_r5": "T->I R@5", "i2t_r1": "I->T R@1", "i2t_r5": "I->T R@5", "rsum": "R-sum"}


def vlkit(*args, threads: int, timeout: float = 3600) -> str:
    """``python -m vlkit ARGS``'s stdout (see :func:`_common.run_vlkit`)."""
    return run_vlkit(*args, threads=threads, timeout=timeout)


def prepare(work: Path, data: str | None, run: str | None, epochs: int, threads: int) -> tuple[Path, Path, dict]:
    """The dataset and the trained run (made when not given), and the seconds each took."""
    seconds: dict[str, float] = {}
    if data is None:
        start = time.perf_counter()
        vlkit("data", "synth", "--out", work / "synth", "--n", "1000", threads=threads)
        seconds["synth"] = time.perf_counter() - start
        dataset = work / "synth" / "synth.lance"
    else:
        dataset = Path(data)
    if run is None:
        start = time.perf_counter()
        run_dir = work / "albef_itm"
        vlkit("train", "albef_vqa_synth", f"datasets={{synth: {{path: {dataset}}}}}",
              "tasks=[{name: itm, dataset: synth}]", "best_metric=val/synth/rsum", f"output_dir={run_dir}",
              f"epochs={epochs}", "progress=false", threads=threads)
        seconds["train"] = time.perf_counter() - start
    else:
        run_dir = Path(run)
    return dataset, run_dir, seconds


def measure(run: Path, dataset: Path, split: str, k: int, threads: int) -> dict:
    """Retrieval on ``split`` without and with ``--rerank k``."""
    base = ["eval", run, "--task", "retrieval", "--data", dataset, "--split", split, "--json"]
    plain = json.loads(vlkit(*base, threads=threads))
    reranked = json.loads(vlkit(*base, "--rerank", str(k), threads=threads))
    prefix = f"{split}/{Path(dataset).stem}/"

    def pick(metrics: dict, suffix: str = "") -> dict:
        return {name: metrics[prefix + name + suffix] for name in FIGURES}

    before = pick(plain["metrics"])
    assert pick(reranked["metrics"], "_itc") == before, "the metrics before re-ranking differ between the runs"
    return {"images": plain["images"], "captions": plain["captions"], "itc": before,
            "reranked": pick(reranked["metrics"]), "pairs": reranked["rerank_pairs"],
            "seconds_itc": plain["seconds"], "seconds_reranked": reranked["seconds"],
            "seconds_rerank_only": reranked["rerank_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a trained ALBEF run to evaluate (default: train one)")
    parser.add_argument("--data", help="the synth dataset (default: make one of 1000 images)")
    parser.add_argument("--out", help="keep the dataset and run here (default: a temporary directory)")
    parser.add_argument("--epochs", type=int, default=60, help="training epochs (default 60)")
    parser.add_argument("--k", type=int, default=16, help="candidates re-ranked per query (default 16)")
    parser.add_argument("--splits", nargs="+", default=["test", "val"], help="splits to evaluate")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of every command (default 1: steadier on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.out or tmp)
        work.mkdir(parents=True, exist_ok=True)
        dataset, run, seconds = prepare(work, args.data, args.run, args.epochs, args.threads)
        results = {split: measure(run, dataset, split, args.k, args.threads) for split in args.splits}
    machine = machine_description(torch.device("cpu"))
    trained = f"trained {args.epochs} epochs here" if args.run is None else f"run {args.run}"
    print(f"ITM re-ranking of the top {args.k}: albef-tiny ({trained}) on synth; {machine}, "
          f"{args.threads} torch thread(s)\n")
    print("| split | ranking | " + " | ".join(LABELS[f] for f in FIGURES) + " | pairs | eval s |")
    print("|---|---|" + "---|" * (len(FIGURES) + 2))
    for split, r in results.items():
        name = f"{split} ({r['images']} images, {r['captions']} captions)"
        print(f"| {name} | ITC | " + " | ".join(f"{r['itc'][f]:.1f}" for f in FIGURES) + f" | - | "
              f"{r['seconds_itc']:.1f} |")
        print(f"| {name} | ITC top {args.k} + ITM | " + " | ".join(f"{r['reranked'][f]:.1f}" for f in FIGURES)
              + f" | {r['pairs']} | {r['seconds_reranked']:.1f} (re-ranking {r['seconds_rerank_only']:.1f}) |")
    if seconds:
        print("\nseconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    print()
    print(json.dumps({"bench": "rerank", "machine": machine, "k": args.k, "epochs": args.epochs if args.run is None
                      else None, "run": args.run, "threads": args.threads, "results": results,
                      "seconds": {k: round(v, 1) for k, v in seconds.items()}}))


if __name__ == "__main__":
    main()
