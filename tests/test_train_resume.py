"""Exact resume: a run killed mid-epoch with SIGKILL and resumed logs the same losses, step for step, as an
uninterrupted run (synthetic data, CPU, fp32). A checkpoint of another model is refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import run_cli

CONFIG = """# vlkit train {path}
model: {{name: clip-tiny, args: {{patch_dropout: 0.25}}}}
datasets: {{synth: {{path: {data}}}}}
tasks: [{{name: retrieval, dataset: synth}}]
batch_size: 32
epochs: 3
log_every: 1
save_every: 3
keep_last: 2
progress: false
tensorboard: false
optim: {{warmup_steps: 3, lr_image: 1.0e-3, lr_text: 1.0e-3, lr_head: 1.0e-3}}
"""


def write_config(tmp_path: Path, data: Path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(CONFIG.format(path=path, data=data))
    return path


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "train/loss" in row:
            out[row["step"]] = row["train/loss"]
    return out


def test_killed_run_resumes_exactly(synth, tmp_path):
    cfg = write_config(tmp_path, synth)
    full = run_cli("train", cfg, f"output_dir={tmp_path / 'full'}")
    assert full.returncode == 0, full.stderr
    expected = losses(tmp_path / "full")
    assert len(expected) >= 15  # 3 epochs of ~7 steps

    run_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "vlkit", "train", str(cfg), f"output_dir={run_dir}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (run_dir / "checkpoints" / "latest").exists():
        time.sleep(0.002)
    assert proc.poll() is None, "run ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "model").exists()  # killed before the end
    killed_at = max(losses(run_dir))
    assert killed_at < max(expected)

    resumed = run_cli("train", cfg, f"output_dir={run_dir}", "resume=latest")
    assert resumed.returncode == 0, resumed.stderr
    got = losses(run_dir)
    assert sorted(got) == sorted(expected)
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), f"step {step}"


def test_resume_refuses_another_model(synth, tmp_path):
    cfg = write_config(tmp_path, synth)
    first = run_cli("train", cfg, f"output_dir={tmp_path / 'r'}", "max_steps=3")
    assert first.returncode == 0, first.stderr
    other = run_cli("train", cfg, f"output_dir={tmp_path / 'r'}", "resume=latest", "model.args.vision_layers=3")
    assert other.returncode == 2
    assert "checkpoint of another model" in other.stderr and "Traceback" not in other.stderr
