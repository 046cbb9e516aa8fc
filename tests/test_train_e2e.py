"""A whole recipe on tiny synthetic data must actually learn: the loss falls and retrieval beats chance."""

from __future__ import annotations

import json

from vlkit.config.load import load_config
from vlkit.data.store import dataset_info
from vlkit.train.trainer import Trainer



def test_clip_tiny_learns_synthetic_shapes(synth, tmp_path):
    cfg = load_config(None, [f"datasets={{synth: {{path: {synth}}}}}", "tasks=[{name: retrieval, dataset: synth}]",
                             "model.name=clip-tiny", "batch_size=32", "epochs=12", "log_every=1",
                             "progress=false", f"output_dir={tmp_path / 'run'}", "optim.warmup_steps=10",
                             "optim.lr_image=2e-3", "optim.lr_text=2e-3", "optim.lr_head=2e-3",
                             "best_metric=val/synth/rsum", "eval_every=20", "save_every=20"])
    metrics = Trainer(cfg).run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r["train/loss"] for r in rows if "train/loss" in r]
    assert sum(train[-5:]) / 5 < 0.75 * sum(train[:5]) / 5
    val = [r for r in rows if "val/synth/t2i_r1" in r]
    n_val = dataset_info(synth)["splits"]["val"]
    chance_r5 = 100 * 5 / n_val  # a random ranking puts the right image in the top 5 this often
    assert metrics["val/synth/t2i_r5"] > 2 * chance_r5 and metrics["val/synth/i2t_r5"] > 2 * chance_r5
    assert val[-1]["val/synth/rsum"] > val[0]["val/synth/rsum"]
    assert (tmp_path / "run" / "checkpoints" / "best" / "state.pt").exists()
