"""CapFilt end to end: a tiny BLIP trained on synthetic shapes whose training captions are partly corrupted (a
third of the images carry another image's captions) filters them with ``vlkit capfilt``: most corrupted captions
are dropped, most true ones kept, and the written dataset says where each caption came from."""

from __future__ import annotations

import json
import random

import lance
import pytest

from .conftest import run_cli

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


@pytest.fixture(scope="module")
def noisy(synth, tmp_path_factory):
    """The synth fixture's images with a third of its training images given another image's captions (same
    splits); returns the dataset and the corrupted ``(id, caption)`` pairs."""
    from vlkit.data.ingest import ingest

    work = tmp_path_factory.mktemp("capfilt")
    rows = lance.dataset(str(synth)).to_table(columns=["id", "captions", "class_name", "split"]).to_pylist()
    train = [r for r in rows if r["split"] == "train"]
    rng = random.Random(0)
    corrupted = set()
    for row in rng.sample(train, len(train) // 3):
        other = rng.choice([r for r in train if r["class_name"] != row["class_name"]])
        row["captions"] = list(other["captions"])
        corrupted.update((row["id"], c) for c in row["captions"])
    source = work / "noisy.jsonl"
    source.write_text("".join(json.dumps({"image": r["id"], "text": r["captions"], "split": r["split"]}) + "\n"
                              for r in rows))
    out = work / "noisy.lance"
    ingest([source], out, images_root=synth.parent, progress=False)
    return out, corrupted


@pytest.fixture(scope="module")
def blip_run(noisy, tmp_path_factory):
    """blip-tiny trained on the noisy captions (ITC + ITM + LM)."""
    from vlkit.config.load import load_config
    from vlkit.train.trainer import Trainer

    run = tmp_path_factory.mktemp("blip_capfilt") / "run"
    from vlkit.config.recipes import recipe_path

    cfg = load_config(recipe_path("blip_synth"), [f"datasets.synth.path={noisy[0]}", f"output_dir={run}", "epochs=20",
                                     "progress=false", "tensorboard=false", "eval_every=1000000",
                                     "best_metric=null"])
    Trainer(cfg).run()
    return run


def _auc(positive: list[float], negative: list[float]) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    wins = sum((p > n) + 0.5 * (p == n) for p in positive for n in negative)
    return wins / (len(positive) * len(negative))


def test_capfilt_drops_most_corrupted_captions(noisy, blip_run, tmp_path):
    data, corrupted = noisy
    version = lance.dataset(str(data)).version
    # 1. a dry run writes every caption's score, and no dataset
    decisions = tmp_path / "decisions.jsonl"
    proc = run_cli("capfilt", blip_run, "--data", data, "--dry-run", "--decisions", decisions, "--json", timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert lance.dataset(str(data)).version == version
    rows = [json.loads(line) for line in decisions.read_text().splitlines()]
    original = [r for r in rows if r["source"] == "original"]
    bad_scores = [r["score"] for r in original if (r["id"], r["text"]) in corrupted]
    true_scores = [r["score"] for r in original if (r["id"], r["text"]) not in corrupted]
    assert len(bad_scores) == len(corrupted)
    auc = _auc(true_scores, bad_scores)
    assert auc >= 0.62, auc  # the filter tells true captions from corrupted ones (0.5 would be chance)
    # 2. a threshold read off the scores alone (no labels): the median of the original captions' scores
    threshold = sorted(r["score"] for r in original)[len(original) // 2]
    out = tmp_path / "filtered.lance"
    proc = run_cli("capfilt", blip_run, "--data", data, "--out", out, "--threshold", f"{threshold:.6f}", "--json",
                   timeout=600)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert lance.dataset(str(data)).version == version  # --out leaves the source alone
    before = {r["id"]: r for r in lance.dataset(str(data)).to_table(columns=["id", "captions", "split"]).to_pylist()}
    after = {r["id"]: r for r in lance.dataset(str(out)).to_table(
        columns=["id", "captions", "caption_sources", "caption_scores", "captions_dropped", "split"]).to_pylist()}
    assert set(after) == set(before)
    bad = kept_bad = good = kept_good = 0
    for image_id, row in before.items():
        new = after[image_id]
        if row["split"] != "train":  # other splits untouched
            assert new["captions"] == row["captions"] and new["caption_scores"] is None
            continue
        assert new["captions"], image_id  # never an image without a caption
        assert len(new["caption_sources"]) == len(new["captions"]) == len(new["caption_scores"])
        assert set(new["captions"]) | set(new["captions_dropped"]) >= set(row["captions"])
        for caption in row["captions"]:
            if (image_id, caption) in corrupted:
                bad += 1
                kept_bad += caption in new["captions"]
            else:
                good += 1
                kept_good += caption in new["captions"]
    dropped_bad, dropped_true = 1 - kept_bad / bad, 1 - kept_good / good
    print(f"capfilt: auc {auc:.3f}, threshold {threshold:.3f}, dropped corrupted {dropped_bad:.3f}, dropped true {dropped_true:.3f}")
    assert dropped_bad >= 0.5, (dropped_bad, dropped_true, auc)  # most corrupted captions are gone
    assert dropped_bad >= dropped_true + 0.15, (dropped_bad, dropped_true, auc)  # far more than true ones
    assert summary["original"] == bad + good and summary["synthetic"] >= 1
    sources = {s for r in after.values() if r["split"] == "train" for s in r["caption_sources"]}
    assert sources <= {"original", "synthetic"} and "original" in sources
