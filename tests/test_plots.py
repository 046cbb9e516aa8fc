"""Training curves: vlkit.train.plots.plot_run and the ``vlkit plot`` subcommand."""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")
from PIL import Image

from vlkit.cli import plot as plot_cli
from vlkit.errors import VlkitError
from vlkit.train.plots import _panels, ema, metric_group, plot_run, read_metrics


def write_run(run: Path, steps: int = 200, val_every: int = 50, seed: int = 0) -> Path:
    """A synthetic run: noisy decaying loss, warmup + cosine lr, throughput, validation every ``val_every`` steps."""
    rng = random.Random(seed)
    run.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(1, steps + 1):
        loss = (5.0 * math.exp(-step / 35) + 0.25) * math.exp(rng.gauss(0, 0.15))
        warmup = 20
        lr = 5e-4 * step / warmup if step <= warmup else 2.5e-4 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))
        line = {"step": step, "train/loss": loss, "train/lr": lr, "train/samples_per_s": 1200 + rng.gauss(0, 40)}
        lines.append(json.dumps(line))
        if step % val_every == 0:
            r1 = 60 * (1 - math.exp(-step / 80))
            val = {
                "step": step,
                "val/data/t2i_r1": r1,
                "val/data/t2i_r5": min(100, r1 * 1.5),
                "val/data/t2i_r10": min(100, r1 * 1.7),
                "val/data/i2t_r1": r1 * 1.1,
                "val/data/i2t_r5": min(100, r1 * 1.6),
                "val/data/i2t_r10": min(100, r1 * 1.75),
                "val/data/loss": 3.0 * math.exp(-step / 60) + 0.5,
            }
            lines.append(json.dumps(val))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run


def non_white_fraction(path: Path) -> float:
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
    return float((pixels.min(axis=2) < 235).mean())


def test_plot_run_writes_a_real_png(tmp_path):
    run = write_run(tmp_path / "run")
    out = plot_run(run, tmp_path / "figs" / "curves.png")
    assert out == tmp_path / "figs" / "curves.png" and out.is_file()
    with Image.open(out) as img:
        img.verify()
    with Image.open(out) as img:
        assert img.format == "PNG"
        width, height = img.size
    assert 800 <= width <= 5000 and 500 <= height <= 5000
    assert 0.02 < non_white_fraction(out) < 0.6
    # Coloured lines, not just black text and grey grid.
    rgb = np.asarray(Image.open(out).convert("RGB"), dtype=np.int16)
    assert ((rgb.max(axis=2) - rgb.min(axis=2)) > 80).mean() > 0.001
    assert not list(out.parent.glob(".*tmp"))  # the temporary file was renamed away


def test_default_out_and_cli(tmp_path, capsys):
    run = write_run(tmp_path / "run", steps=60, val_every=20)
    parser = argparse.ArgumentParser(prog="vlkit")
    plot_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["plot", str(run), "--metrics", "train/loss", "val"])
    assert args.func(args) == 0
    assert (run / "curves.png").is_file()
    assert "curves.png" in capsys.readouterr().out
    args = parser.parse_args(["plot", str(run), "-o", str(tmp_path / "c.svg")])
    args.func(args)
    assert (tmp_path / "c.svg").read_text().lstrip().startswith("<?xml")


def test_read_metrics_merges_sparse_lines_and_resumed_steps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [
        {"step": 2, "train/loss": 2.0},
        {"step": 1, "train/loss": 3.0, "note": "text is ignored", "ok": True},
        {"step": 2, "train/loss": 1.5},  # resumed: the later value wins
        {"train/loss": 9.0},  # no step: skipped
        {"step": 3, "val/d/t2i_r1": 10.0, "train/loss": float("nan")},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n" + '{"step": 4, "train/lo')  # partial last line
    series = read_metrics(path)
    assert list(series) == ["train/loss", "val/d/t2i_r1"]
    assert series["train/loss"].steps.tolist() == [1, 2] and series["train/loss"].values.tolist() == [3.0, 1.5]
    assert series["val/d/t2i_r1"].name == "t2i_r1" and series["val/d/t2i_r1"].group == "val/d"


def test_groups_and_panels(tmp_path):
    assert metric_group("val/coco/t2i_r1") == "val/coco"
    assert metric_group("train/loss") == "train"
    assert metric_group("epoch") == "epoch"
    panels = _panels(read_metrics(write_run(tmp_path / "r") / "metrics.jsonl"))
    keys = [[s.key for s in p.series] for p in panels]
    # Loss, lr and throughput differ by decades: separate panels. Validation recalls share one.
    assert ["train/loss"] in keys and ["train/lr"] in keys and ["train/samples_per_s"] in keys
    recalls = [f"val/data/{d}_r{k}" for d in ("t2i", "i2t") for k in (1, 5, 10)]
    assert recalls in keys
    assert [p.title for p in panels if p.series[0].key == "train/lr"] == ["train · lr"]


def test_ema_is_bias_corrected():
    assert ema(np.array([5.0, 5.0, 5.0]), span=10).tolist() == pytest.approx([5.0, 5.0, 5.0])
    smooth = ema(np.array([0.0, 10.0] * 50), span=20)
    assert 3 < smooth[-1] < 7


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(VlkitError, match=r"metrics\.jsonl"):
        plot_run(tmp_path / "nothing-here")


def test_no_numeric_metrics_is_an_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "note": "hello"}\n{"step": 2, "done": true}\n')
    with pytest.raises(VlkitError, match=r"metrics\.jsonl.*no numeric metrics"):
        plot_run(tmp_path)
    assert not (tmp_path / "curves.png").exists()


def test_bad_line_filter_and_format_errors(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train/loss": 1}\nnot json\n{"step": 2, "train/loss": 0.5}\n')
    with pytest.raises(VlkitError, match="line 2"):
        plot_run(tmp_path)
    write_run(tmp_path, steps=30, val_every=10)
    with pytest.raises(VlkitError, match="no metric matches"):
        plot_run(tmp_path, metrics=["nope/*"])
    with pytest.raises(VlkitError, match="format"):
        plot_run(tmp_path, tmp_path / "curves.xyz")
