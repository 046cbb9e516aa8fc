"""CapFilt's effect: how many corrupted captions the filter removes, how many true ones it keeps, and whether a
model trained on the bootstrapped captions retrieves better than one trained on the noisy ones.

Protocol, all through the command line:

1. ``vlkit data synth --n N`` and ``vlkit ingest``: clean captions and their splits;
2. a noisy copy: for a fraction ``--noise`` of the training images, every caption is replaced by the captions of
   another training image whose largest object differs (noise like mismatched web alt-text); validation and
   test captions stay clean; ingested with the same splits;
3. ``vlkit train blip_synth`` on the noisy data (``--epochs``);
4. ``vlkit capfilt RUN --data noisy --dry-run --decisions FILE`` gives every caption's matching probability;
   the threshold is their median over the original captions (read off the scores, no labels; ``--threshold``
   gives one instead); then ``vlkit capfilt RUN --data noisy --out filtered --threshold T``: the share of
   corrupted captions dropped, of true captions kept, the ranking quality of the scores (AUC of true over
   corrupted captions), the synthetic captions added and how many of those name the image's largest object;
5. ``vlkit train blip_synth`` again on the filtered data, and retrieval R@1 on the clean validation split of the
   models trained on noisy and on filtered captions.

Run: ``python bench/capfilt_effect.py [--n 1000] [--noise 0.3] [--epochs 15] [--threshold 0.5] [--threads 2]``.
Prints a markdown table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_description, run_vlkit  # noqa: E402



def vlkit(*args, threads: int, timeout: float = 7200) -> str:
    """``python -m vlkit ARGS``'s stdout (see :func:`_common.run_vlkit`)."""
    return run_vlkit(*args, threads=threads, timeout=timeout)


def noisy_copy(clean_jsonl: Path, clean_lance: Path, out_jsonl: Path, fraction: float, seed: int) -> set[tuple[str, str]]:
    """Write ``out_jsonl``: the clean rows with their splits, a ``fraction`` of the training rows given another
    training image's captions. Returns the ``(image id, caption)`` pairs that are corrupted."""
    import lance

    splits = {r["id"]: r["split"] for r in lance.dataset(str(clean_lance)).to_table(columns=["id", "split"]).to_pylist()}
    rows = [json.loads(line) for line in clean_jsonl.read_text().splitlines() if line.strip()]
    for row in rows:
        row["split"] = splits[row["image"]]
    train = [r for r in rows if r["split"] == "train"]
    rng = random.Random(seed)
    corrupted: set[tuple[str, str]] = set()
    for row in rng.sample(train, int(fraction * len(train))):
        other = rng.choice([r for r in train if r["class_name"] != row["class_name"]])
        row["text"] = list(other["text"])
        corrupted.update((row["image"], t) for t in row["text"])
    out_jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return corrupted


def train(data: Path, out: Path, epochs: int, threads: int) -> None:
    vlkit("train", "blip_synth", f"datasets.synth.path={data}", f"output_dir={out}", f"epochs={epochs}",
          "progress=false", "tensorboard=false", threads=threads)


def retrieval(run: Path, data: Path, threads: int) -> dict:
    out = json.loads(vlkit("eval", run, "--data", data, "--split", "val", "--json", threads=threads))
    return {k.split("/")[-1]: round(v, 2) for k, v in out["metrics"].items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--noise", type=float, default=0.3)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--threshold", type=float, help="default: the median score of the original captions")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", help="working folder (default: a temporary one)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="capfilt-bench-"))
    t = args.threads
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    vlkit("data", "synth", "--out", work / "synth", "--n", args.n, threads=t)
    clean = work / "synth" / "synth.lance"
    corrupted = noisy_copy(work / "synth" / "synth.jsonl", clean, work / "synth" / "noisy.jsonl", args.noise, args.seed)
    noisy = work / "noisy.lance"
    vlkit("ingest", work / "synth" / "noisy.jsonl", "--out", noisy, threads=t)
    start = time.perf_counter()
    train(noisy, work / "run-noisy", args.epochs, t)
    seconds["train_noisy"] = time.perf_counter() - start
    start = time.perf_counter()
    decisions = work / "decisions.jsonl"
    vlkit("capfilt", work / "run-noisy", "--data", noisy, "--dry-run", "--decisions", decisions, "--json", threads=t)
    scored = [json.loads(line) for line in decisions.read_text().splitlines()]
    original = sorted(r["score"] for r in scored if r["source"] == "original")
    threshold = args.threshold if args.threshold is not None else original[len(original) // 2]
    true_scores = [r["score"] for r in scored if r["source"] == "original" and (r["id"], r["text"]) not in corrupted]
    bad_scores = [r["score"] for r in scored if (r["id"], r["text"]) in corrupted]
    auc = sum((p > n) + 0.5 * (p == n) for p in true_scores for n in bad_scores) / max(1, len(true_scores) * len(bad_scores))
    filtered = work / "filtered.lance"
    summary = json.loads(vlkit("capfilt", work / "run-noisy", "--data", noisy, "--out", filtered, "--threshold",
                               f"{threshold:.6f}", "--json", threads=t))
    seconds["capfilt"] = time.perf_counter() - start
    import lance

    rows = lance.dataset(str(noisy)).to_table(columns=["id", "captions", "class_name", "split"]).to_pylist()
    after = {r["id"]: r for r in lance.dataset(str(filtered)).to_table(
        columns=["id", "captions", "caption_sources"]).to_pylist()}
    stats = {"corrupted": 0, "corrupted_dropped": 0, "true": 0, "true_kept": 0, "synthetic_added": 0,
             "synthetic_naming_largest": 0}
    for r in rows:
        if r["split"] != "train":
            continue
        kept = set(after[r["id"]]["captions"])
        for caption in r["captions"]:
            bad = (r["id"], caption) in corrupted
            stats["corrupted" if bad else "true"] += 1
            if bad and caption not in kept:
                stats["corrupted_dropped"] += 1
            if not bad and caption in kept:
                stats["true_kept"] += 1
        for caption, source in zip(after[r["id"]]["captions"], after[r["id"]]["caption_sources"]):
            if source == "synthetic":
                stats["synthetic_added"] += 1
                stats["synthetic_naming_largest"] += r["class_name"] in caption
    start = time.perf_counter()
    train(filtered, work / "run-filtered", args.epochs, t)
    seconds["train_filtered"] = time.perf_counter() - start
    recall = {"noisy": retrieval(work / "run-noisy", clean, t), "filtered": retrieval(work / "run-filtered", clean, t)}
    pct = lambda a, b: round(100.0 * a / max(1, b), 1)  # noqa: E731
    result = {"bench": "capfilt_effect", "machine": machine_description(torch.device("cpu")) + f", {t} threads",
              "n": args.n, "noise": args.noise, "epochs": args.epochs, "threshold": round(threshold, 4),
              "auc_true_over_corrupted": round(auc, 3), **stats,
              "corrupted_dropped_pct": pct(stats["corrupted_dropped"], stats["corrupted"]),
              "true_kept_pct": pct(stats["true_kept"], stats["true"]),
              "synthetic_naming_largest_pct": pct(stats["synthetic_naming_largest"], stats["synthetic_added"]),
              "capfilt": {k: summary[k] for k in ("images", "captions_before", "captions_after", "rescued_images")},
              "val_recall": recall, "seconds": {k: round(v, 1) for k, v in seconds.items()}}
    print(f"CapFilt on {args.n} synthetic images, {int(100 * args.noise)}% of training images with another image's "
          f"captions, BLIP-tiny trained {args.epochs} epochs; {result['machine']}\n")
    print("| figure | value |\n|---|---|")
    print(f"| AUC: a true caption scores above a corrupted one | {result['auc_true_over_corrupted']} |")
    print(f"| threshold (median score of the original captions) | {result['threshold']} |")
    print(f"| corrupted captions dropped | {result['corrupted_dropped_pct']}% of {stats['corrupted']} |")
    print(f"| true captions kept | {result['true_kept_pct']}% of {stats['true']} |")
    print(f"| synthetic captions added (naming the largest object) | {stats['synthetic_added']} "
          f"({result['synthetic_naming_largest_pct']}%) |")
    for name in ("t2i_r1", "i2t_r1", "rsum"):
        print(f"| val {name}: trained on noisy -> on filtered | {recall['noisy'].get(name)} -> "
              f"{recall['filtered'].get(name)} |")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
