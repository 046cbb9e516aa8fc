"""The command line end to end, in real subprocesses: synth, info, show, quickstart."""

from __future__ import annotations

import json

from PIL import Image

from .conftest import run_cli


def test_synth_info_show(tmp_path):
    proc = run_cli("data", "synth", "--out", tmp_path / "s", "--n", "40", "--seed", "2")
    assert proc.returncode == 0, proc.stderr
    dataset = tmp_path / "s" / "synth.lance"
    info = json.loads(run_cli("data", "info", dataset, "--json").stdout)
    jsonl = [json.loads(line) for line in (tmp_path / "s" / "synth.jsonl").read_text().splitlines()]
    assert info["images"] == 40
    assert info["captions"] == sum(len(r["text"]) for r in jsonl)
    assert info["questions"] == sum(len(r["questions"]) for r in jsonl)
    assert len(info["classes"]) == 18 and sum(info["splits"].values()) == 40
    text = run_cli("data", "info", dataset).stdout
    assert "images      40" in text and "classes     18" in text
    proc = run_cli("data", "show", dataset, "--out", tmp_path / "sheet.png", "--n", "6")
    assert proc.returncode == 0, proc.stderr
    sheet = Image.open(tmp_path / "sheet.png")
    assert sheet.width == 4 * 240 and sheet.height > 2 * 240
    # the first thumbnail is the first image, upscaled: its centre pixel is not the white page
    assert sheet.getpixel((8 + 112, 8 + 112)) != (255, 255, 255)


def test_quickstart_runs_the_main_job(tmp_path):
    """The whole main job, shortened to 2 epochs (the captioner to 1): ingest, train, evaluate, curves, index,
    example query, a caption of the query's top image."""
    proc = run_cli("quickstart", "--out", tmp_path / "qs", "--caption-epochs", "1", "epochs=2", "progress=false",
                   cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "76 images, 380 captions, 26 questions" in proc.stdout
    assert "t2i_r1" in proc.stdout and "example query" in proc.stdout
    for path in ("sheet.png", "run/curves.png", "run/model/model.safetensors", "run/metrics.jsonl",
                 "run/config.yaml", "run/environment.json", "summary.json", "index/index.json",
                 "index/model/model.safetensors"):
        assert (tmp_path / "qs" / path).exists(), path
    hits = [line for line in proc.stdout.split("example query", 1)[1].splitlines()[1:4]]
    assert len(hits) == 3 and all(".jpg" in line for line in hits), proc.stdout  # score, image id, caption
    summary = json.loads((tmp_path / "qs" / "summary.json").read_text())
    assert 0 <= summary["metrics"]["val/data/t2i_r1"] <= 100
    # the captioner's caption of the top image, also written by `vlkit caption` from its run
    top = hits[0].split()[1]
    assert summary["caption"]["image"] == top and summary["caption"]["caption"].strip()
    assert f"{top}: {summary['caption']['caption']!r}" in proc.stdout
    assert (tmp_path / "qs" / "caption-run" / "model" / "generation.json").exists()


def test_help_lists_subcommands():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for name in ("ingest", "data", "train", "configs", "plot", "embed", "index", "search", "quickstart"):
        assert name in proc.stdout
