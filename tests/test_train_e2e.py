"""A whole recipe on tiny synthetic data must actually learn: the loss falls and retrieval beats chance."""

from __future__ import annotations

import json

from vlkit.data.store import dataset_info



def test_clip_tiny_learns_synthetic_shapes(synth, trained_run):
    run, metrics = trained_run
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r["train/loss"] for r in rows if "train/loss" in r]
    assert sum(train[-5:]) / 5 < 0.75 * sum(train[:5]) / 5
    val = [r for r in rows if "val/synth/t2i_r1" in r]
    n_val = dataset_info(synth)["splits"]["val"]
    chance_r5 = 100 * 5 / n_val  # a random ranking puts the right image in the top 5 this often
    assert metrics["val/synth/t2i_r5"] > 2 * chance_r5 and metrics["val/synth/i2t_r5"] > 2 * chance_r5
    assert val[-1]["val/synth/rsum"] > val[0]["val/synth/rsum"]
    assert (run / "checkpoints" / "best" / "state.pt").exists()
