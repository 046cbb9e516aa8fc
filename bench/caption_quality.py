"""Caption quality on Flickr8k-1k: two retrieval baselines and vlkit's ``caption_quickstart`` recipe, side by side.

Protocol: the first 800 images by sorted file name (4000 captions) are the training set, the last 200 images are
the test set, each scored against its 5 references (1000) with :func:`vlkit.metrics.captioning.caption_metrics`
(PTB tokens; BLEU-1..4, METEOR, ROUGE-L, CIDEr-D; times 100).

- nearest-neighbour consensus: each test image's 30 nearest training images by cosine of pooled ImageNet
  EfficientNet-Lite0 features (224 centre crop, the preprocessing of vlkit's BriVL models); their 150 captions
  are the candidates, and the answer is the candidate with the highest mean TF-IDF cosine to the other
  candidates (cosine of 1- to 4-gram TF-IDF vectors, averaged over n; idf from the 4000 training captions).
- constant caption: the most central training caption (highest mean TF-IDF cosine to all other training
  captions) for every test image; what a model that ignores the image can reach.
- vlkit caption_quickstart: the recipe trained on the 800 training images and evaluated on the 200 test images,
  all through the command line: ``vlkit ingest`` of a CSV with a ``split`` column, ``vlkit train
  caption_quickstart``, ``vlkit eval RUN --task captioning --split test --json``.

Run: ``python bench/caption_quality.py [--data ../shared/data/flickr8k-1k] [--baselines-only] [--out DIR]``
Prints a markdown table and one JSON line.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from scipy import sparse

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import last_json_line, machine_description  # noqa: E402

from vlkit.data.transforms import ImageTransform  # noqa: E402
from vlkit.metrics.caption_tokenize import simple_tokenize  # noqa: E402
from vlkit.metrics.captioning import caption_metrics  # noqa: E402
from vlkit.models.brivl.model import BriVLConfig  # noqa: E402
from vlkit.modules.encoders.efficientnet import efficientnet_lite0  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
KEYS = ("bleu1", "bleu4", "meteor", "rouge_l", "cider")
LABELS = {"bleu1": "BLEU-1", "bleu4": "BLEU-4", "meteor": "METEOR", "rouge_l": "ROUGE-L", "cider": "CIDEr-D"}
# Measured before with this protocol (nearest neighbour: BLEU-4, METEOR, ROUGE-L, CIDEr; constant: CIDEr).
PREVIOUS = {"nearest_neighbour": {"bleu4": 12.3, "meteor": 14.4, "rouge_l": 34.0, "cider": 27.0},
            "constant": {"cider": 10.1}}
NEIGHBOURS = 30
TRAIN_IMAGES = 800


def load_split(data: Path) -> tuple[list[str], list[str], dict[str, list[str]]]:
    """Training and test image names (sorted, first 800 / the rest) and every image's captions."""
    captions: dict[str, list[str]] = {}
    with open(data / "captions.txt", newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            captions.setdefault(row["image"], []).append(row["caption"])
    names = sorted(captions)
    return names[:TRAIN_IMAGES], names[TRAIN_IMAGES:], captions


@torch.no_grad()
def image_features(images: Path, names: list[str], batch_size: int = 50) -> torch.Tensor:
    """L2-normalised, globally pooled ImageNet EfficientNet-Lite0 features ``[images, 1280]``."""
    preprocess = BriVLConfig().preprocess
    transform = ImageTransform(preprocess.image_size, mean=tuple(preprocess.mean), std=tuple(preprocess.std))
    cnn = efficientnet_lite0(pretrained=True, num_classes=0).eval()
    out = []
    for start in range(0, len(names), batch_size):
        pixels = torch.stack([transform((images / n).read_bytes()) for n in names[start:start + batch_size]])
        x = transform.normalize(pixels)  # [batch, 3, 224, 224]
        out.append(cnn.forward_features(x).mean(dim=(2, 3)))  # [batch, 1280]
    return torch.nn.functional.normalize(torch.cat(out), dim=-1)


class NgramTfidf:
    """TF-IDF vectors of 1- to 4-grams (one sparse matrix per n, rows L2-normalised); idf from a corpus.

    ``similarity(a, b)`` is the cosine of the n-gram vectors averaged over n = 1..4 (a caption too short for
    some n contributes 0 for it). idf(g) = log(documents / df(g)), each caption a document.
    """

    def __init__(self, corpus_tokens: list[list[str]], max_n: int = 4):
        self.max_n = max_n
        self.vocab = [dict() for _ in range(max_n)]
        df = [Counter() for _ in range(max_n)]
        for words in corpus_tokens:
            for n in range(max_n):
                df[n].update(set(self._grams(words, n + 1)))
        self.idf = []
        for n in range(max_n):
            for g in df[n]:
                self.vocab[n][g] = len(self.vocab[n])
            idf = np.zeros(len(self.vocab[n]))
            for g, i in self.vocab[n].items():
                idf[i] = math.log(len(corpus_tokens) / df[n][g])
            self.idf.append(idf)

    @staticmethod
    def _grams(words: list[str], n: int) -> list[tuple[str, ...]]:
        return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]

    def vectors(self, token_lists: list[list[str]]) -> list[sparse.csr_matrix]:
        """One ``[texts, vocab_n]`` matrix per n; n-grams outside the corpus are left out."""
        mats = []
        for n in range(self.max_n):
            rows, cols, vals = [], [], []
            for r, words in enumerate(token_lists):
                for g, c in Counter(self._grams(words, n + 1)).items():
                    i = self.vocab[n].get(g)
                    if i is not None:
                        rows.append(r), cols.append(i), vals.append(c * self.idf[n][i])
            m = sparse.csr_matrix((vals, (rows, cols)), shape=(len(token_lists), len(self.vocab[n])))
            norms = np.sqrt(np.asarray(m.multiply(m).sum(axis=1))).ravel()
            mats.append(sparse.diags(np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)) @ m)
        return mats


def consensus(mats: list[sparse.csr_matrix], rows: np.ndarray) -> int:
    """Index (into ``rows``) of the caption with the highest mean similarity to the other captions of ``rows``."""
    sim = sum((m[rows] @ m[rows].T).toarray() for m in mats) / len(mats)  # [candidates, candidates]
    np.fill_diagonal(sim, 0.0)
    return int(np.argmax(sim.sum(axis=1) / (len(rows) - 1)))


def baselines(data: Path) -> tuple[dict[str, dict], dict[str, float]]:
    """Predictions of both baselines on the test images, scored; and the seconds each step took."""
    train, test, captions = load_split(data)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    feats = image_features(data / "images", train + test)
    seconds["features"] = time.perf_counter() - start
    start = time.perf_counter()
    train_caps = [c for n in train for c in captions[n]]
    owner = np.array([i for i, n in enumerate(train) for _ in captions[n]])
    tokens = [simple_tokenize(c).split() for c in train_caps]
    tfidf = NgramTfidf(tokens)
    mats = tfidf.vectors(tokens)
    # Nearest-neighbour consensus.
    sims = feats[len(train):] @ feats[:len(train)].T  # [test, train]
    nearest = sims.topk(NEIGHBOURS, dim=1).indices.numpy()
    nn_preds = []
    for neighbours in nearest:
        rows = np.flatnonzero(np.isin(owner, neighbours))
        nn_preds.append(train_caps[rows[consensus(mats, rows)]])
    # Constant caption: the highest mean similarity to all other training captions (sum of vectors trick).
    total = sum(m @ np.asarray(m.sum(axis=0)).ravel() - np.asarray(m.multiply(m).sum(axis=1)).ravel() for m in mats)
    mean_sim = np.asarray(total).ravel() / (len(mats) * (len(train_caps) - 1))
    constant = train_caps[int(np.argmax(mean_sim))]
    seconds["select"] = time.perf_counter() - start
    references = [captions[n] for n in test]
    results = {}
    for name, preds in (("nearest_neighbour", nn_preds), ("constant", [constant] * len(test))):
        start = time.perf_counter()
        m = caption_metrics(preds, references)
        seconds[f"score_{name}"] = time.perf_counter() - start
        best, worst = m.best_and_worst(1)
        results[name] = {"metrics": {k: round(v, 2) for k, v in m.as_dict().items()}, "tokenizer": m.tokenizer,
                         "examples": {"best": [test[best[0]], preds[best[0]]],
                                      "worst": [test[worst[0]], preds[worst[0]]]},
                         "note": m.note}
    results["constant"]["caption"] = constant
    return results, seconds


def vlkit_cli(*args: str, timeout: float) -> str:
    """Run ``python -m vlkit ARGS``; its stdout, or RuntimeError with the end of its stderr."""
    done = subprocess.run([sys.executable, "-m", "vlkit", *args], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise RuntimeError(f"vlkit {args[0]} failed (exit {done.returncode}): {tail}")
    return done.stdout


def parse_summary(stdout: str) -> dict:
    """The JSON object ``vlkit eval --json`` printed (whole output, or its last JSON line)."""
    try:
        summary = json.loads(stdout)
    except json.JSONDecodeError:
        summary = last_json_line(stdout)
    if not isinstance(summary, dict) or "metrics" not in summary:
        raise RuntimeError("vlkit eval printed no JSON object with metrics")
    return summary


def quickstart(data: Path, work: Path, overrides: list[str], train_timeout_min: float,
               eval_limit: int | None = None) -> tuple[dict, dict]:
    """Ingest, train ``caption_quickstart`` and evaluate it on the test split, all through the command line.

    A dataset already in ``work`` (an earlier ``--out``) is reused; each run gets a new folder.
    """
    train, test, captions = load_split(data)
    dataset = work / "data.lance"
    seconds = {}
    if not dataset.exists():
        table = work / "flickr8k_captions.csv"
        with open(table, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["image", "caption", "split"])
            for split, names in (("train", train), ("test", test)):
                writer.writerows([n, c, split] for n in names for c in captions[n])
        start = time.perf_counter()
        vlkit_cli("ingest", str(table), "--images-root", str(data / "images"), "--out", str(dataset), "--quiet",
                  timeout=1800)
        seconds["ingest"] = time.perf_counter() - start
    run = next(work / f"run{i or ''}" for i in range(1000) if not (work / f"run{i or ''}").exists())
    start = time.perf_counter()
    # No validation split: the 200 test images stay unseen until the final evaluation.
    vlkit_cli("train", "caption_quickstart", f"datasets.data.path={dataset}", f"output_dir={run}",
              "datasets.data.val_split=null", "progress=false", *overrides, timeout=train_timeout_min * 60)
    seconds["train"] = time.perf_counter() - start
    start = time.perf_counter()
    limit = ["--limit", str(eval_limit)] if eval_limit else []
    summary = parse_summary(vlkit_cli("eval", str(run), "--task", "captioning", "--data", str(dataset),
                                      "--split", "test", "--json", *limit, timeout=3600))
    seconds["eval"] = time.perf_counter() - start
    metrics = {k.rsplit("/", 1)[-1]: round(v, 2) for k, v in summary["metrics"].items() if k.startswith("test/")}
    return {"metrics": metrics, "images": summary.get("images"), "run": str(run)}, seconds


def cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "flickr8k-1k"))
    parser.add_argument("--baselines-only", action="store_true", help="skip training the recipe")
    parser.add_argument("--skip-baselines", action="store_true", help="only the recipe")
    parser.add_argument("--out", help="keep the recipe's dataset and run here (default: a temporary directory)")
    parser.add_argument("--set", nargs="*", default=[], help="key=value overrides of the caption_quickstart recipe")
    parser.add_argument("--train-timeout-minutes", type=float, default=60.0,
                        help="give up on the recipe after this long (its budget is 15 minutes on 2 CPU cores)")
    parser.add_argument("--eval-limit", type=int, help="caption only the first N test images (smoke runs)")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    data = Path(args.data)
    results, seconds = ({}, {}) if args.skip_baselines else baselines(data)
    if not args.baselines_only:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(args.out or tmp)
            work.mkdir(parents=True, exist_ok=True)
            try:
                results["caption_quickstart"], steps = quickstart(data, work, args.set, args.train_timeout_minutes,
                                                                  args.eval_limit)
                seconds.update(steps)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                results["caption_quickstart"] = {"metrics": {}, "error": str(exc).splitlines()[0][:300]}
    machine = machine_description(torch.device("cpu"))
    print(f"Flickr8k-1k captioning: train 800 images / 4000 captions, test 200 images / 1000 references; {machine}\n")
    print("| method | " + " | ".join(LABELS[k] for k in KEYS) + " |")
    print("|---|" + "---|" * len(KEYS))
    names = {"nearest_neighbour": f"nearest-neighbour consensus (k={NEIGHBOURS})", "constant": "constant caption",
             "caption_quickstart": "vlkit caption_quickstart"}
    for key, result in results.items():
        if result.get("images") not in (None, 200):
            names[key] += f" (first {result['images']} test images)"
        print(f"| {names[key]} | " + " | ".join(cell(result["metrics"].get(k)) for k in KEYS) + " |")
        if key in PREVIOUS:
            print("| (measured before) | " + " | ".join(cell(PREVIOUS[key].get(k)) for k in KEYS) + " |")
    print()
    if "constant" in results:
        print(f"constant caption: {results['constant']['caption']!r}")
    if "train" in seconds:
        budget = "within" if seconds["train"] <= 15 * 60 else "over"
        print(f"caption_quickstart trained in {seconds['train'] / 60:.1f} min ({budget} its 15-minute budget)")
    for key, result in results.items():
        if result.get("error"):
            print(f"{names[key]}: not run: {result['error']}")
        elif result.get("note"):
            print(f"{names[key]}: {result['note']}")
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()) + "\n")
    flat = {f"{key}_{k}": v for key, result in results.items() for k, v in result["metrics"].items() if k in KEYS}
    print(json.dumps({"bench": "caption_quality", "machine": machine, **flat, "results": results,
                      "previous": PREVIOUS, "seconds": {k: round(v, 1) for k, v in seconds.items()},
                      "neighbours": NEIGHBOURS, "overrides": args.set}))


if __name__ == "__main__":
    main()
