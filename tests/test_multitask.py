"""Fusion models in the trainer: a tiny ALBEF learns the synthetic questions (beats the majority answer on
held-out images), and a multi-task run (retrieval + VQA on two datasets) trains, evaluates both and resumes
exactly; ``vlkit eval --task vqa`` and ``vlkit ask`` on the trained run."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.conftest import run_cli
from vlkit.config.load import load_config
from vlkit.train.trainer import Trainer


@pytest.fixture(scope="module")
def synth_vqa(tmp_path_factory):
    """A second synthetic dataset (another seed, 400 images) for the VQA side."""
    from vlkit.data.ingest import ingest
    from vlkit.data.synth import generate

    root = tmp_path_factory.mktemp("synth_vqa")
    ingest([generate(root, 400, seed=11)], root / "synth.lance", progress=False, val_fraction=0.15, test_fraction=0.0)
    return root / "synth.lance"


TINY = ["model.name=albef-tiny", "progress=false", "tensorboard=false", "log_every=1", "precision=fp32",
        "optim.warmup_steps=20", "optim.lr_image=1e-3", "optim.lr_text=1e-3", "optim.lr_head=1e-3",
        "optim.weight_decay=0.01"]


@pytest.fixture(scope="module")
def vqa_run(synth_vqa, tmp_path_factory):
    run = tmp_path_factory.mktemp("vqa") / "run"
    cfg = load_config(None, [f"datasets={{qa: {{path: {synth_vqa}}}}}", "tasks=[{name: vqa, dataset: qa}]",
                             f"output_dir={run}", "batch_size=32", "epochs=30", *TINY])
    metrics = Trainer(cfg).run()
    return run, metrics


def test_tiny_albef_beats_the_majority_answer(vqa_run):
    run, metrics = vqa_run
    acc, majority = metrics["val/qa/vqa_acc"], metrics["val/qa/vqa_majority_acc"]
    print(f"\nheld-out synthetic questions ({metrics['val/qa/vqa_questions']:.0f}): tiny ALBEF VQA accuracy "
          f"{acc:.1f}%, majority answer {majority:.1f}%")
    assert acc > majority + 15 and acc > 1.8 * majority
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/qa/loss"] for r in rows if "train/qa/loss" in r]
    assert sum(losses[-10:]) < 0.6 * sum(losses[:10])


def test_eval_and_ask_on_the_vqa_run(vqa_run, synth_vqa, tmp_path):
    run, metrics = vqa_run
    r = run_cli("eval", run, "--task", "vqa", "--data", synth_vqa, "--split", "val", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["metrics"]["val/synth/vqa_acc"] == pytest.approx(metrics["val/qa/vqa_acc"], abs=1e-6)
    assert out["metrics"]["val/synth/vqa_majority_acc"] == pytest.approx(metrics["val/qa/vqa_majority_acc"])
    r = run_cli("eval", run, "--task", "vqa", "--data", synth_vqa, "--split", "val", "--report", tmp_path / "rep")
    assert r.returncode == 0, r.stderr and "VQA accuracy" in r.stdout
    assert "Visual question answering" in (tmp_path / "rep" / "index.html").read_text()
    import lance

    ds = lance.dataset(str(synth_vqa))
    row = ds.to_table(columns=["source", "questions", "answers", "split"]).to_pylist()
    colour = next(r for r in row if r["split"] == "train" and any(q.startswith("what color") for q in r["questions"]))
    q = next(i for i, q in enumerate(colour["questions"]) if q.startswith("what color"))
    image = synth_vqa.parent / colour["source"] if (synth_vqa.parent / colour["source"]).exists() else colour["source"]
    r = run_cli("ask", run, image, colour["questions"][q], "--json", "--top", "3")
    assert r.returncode == 0, r.stderr
    answers = json.loads(r.stdout)["answers"]
    assert len(answers) == 3 and sum(a["probability"] for a in answers) <= 1.0 + 1e-6
    assert answers[0]["answer"] == colour["answers"][q][0]  # a training question it has learned
    for args, message in [((run, image, "  "), "question is empty"),
                          ((run, tmp_path / "none.png", "what?"), "no such image file")]:
        r = run_cli("ask", *args)
        assert r.returncode == 2 and message in r.stderr, r.stderr


MULTI = """# vlkit train {path}
model: {{name: albef-tiny}}
datasets:
  shapes: {{path: {a}}}
  qa: {{path: {b}}}
tasks:
  - {{name: retrieval, dataset: shapes}}
  - {{name: vqa, dataset: qa, weight: 2.0}}
sampling: {{strategy: {strategy}}}
batch_size: 32
max_steps: 12
eval_every: 6
save_every: 4
keep_last: 3
log_every: 1
progress: false
tensorboard: false
optim: {{warmup_steps: 3, lr_image: 1.0e-3, lr_text: 1.0e-3, lr_head: 1.0e-3}}
"""


def _losses(run):
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "train/loss" in row:
            out[row["step"]] = (row["train/loss"], row.get("train/task"))
    return out


@pytest.mark.parametrize("strategy", ["round_robin", "temperature"])
def test_multitask_trains_evaluates_both_and_resumes_exactly(synth, synth_vqa, tmp_path, strategy):
    path = tmp_path / "multi.yaml"
    path.write_text(MULTI.format(path=path, a=synth, b=synth_vqa, strategy=strategy))
    full = run_cli("train", path, f"output_dir={tmp_path / 'full'}")
    assert full.returncode == 0, full.stderr[-3000:]
    expected = _losses(tmp_path / "full")
    assert sorted(expected) == list(range(1, 13))
    tasks = [t for _, t in expected.values()]
    assert set(tasks) == {0, 1}
    if strategy == "round_robin":
        assert tasks == [0, 1] * 6
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val/shapes/t2i_r1" in r]
    assert len(evals) == 2 and all("val/qa/vqa_acc" in r for r in evals)  # both evaluated, named by dataset

    # resume from the step-4 checkpoint: steps 5-12 repeat exactly (task choices, data positions, RNG)
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full", resumed)
    shutil.rmtree(resumed / "model")
    (resumed / "checkpoints" / "latest").write_text("step-00000004")
    r = run_cli("train", path, f"output_dir={resumed}", "resume=latest")
    assert r.returncode == 0, r.stderr[-3000:]
    got = _losses(resumed)
    assert sorted(got) == sorted(expected)
    for step in range(5, 13):
        assert got[step][1] == expected[step][1], step
        assert got[step][0] == pytest.approx(expected[step][0], rel=1e-6, abs=1e-7), step


def test_bad_multitask_configs(synth, synth_vqa, tmp_path):
    path = tmp_path / "multi.yaml"
    path.write_text(MULTI.format(path=path, a=synth, b=synth_vqa, strategy="fixed"))
    r = run_cli("train", path, f"output_dir={tmp_path / 'x'}")
    assert r.returncode == 2 and "weights" in r.stderr, r.stderr
    r = run_cli("train", path, f"output_dir={tmp_path / 'y'}", "sampling.strategy=sometimes")
    assert r.returncode == 2 and "sampling.strategy" in r.stderr
    r = run_cli("train", path, f"output_dir={tmp_path / 'z'}", "model.name=clip-tiny", "sampling.strategy=round_robin")
    assert r.returncode == 2 and "fusion model" in r.stderr, r.stderr


def test_classification_task_learns_the_largest_shape(synth, tmp_path):
    """Visual reasoning as classification: (image, a fixed question) -> the class of the largest shape."""
    from vlkit.data.store import dataset_info

    cfg = load_config(None, [f"datasets={{shapes: {{path: {synth}}}}}",
                             "tasks=[{name: classification, dataset: shapes, prompt: 'which shape is the largest?'}]",
                             f"output_dir={tmp_path / 'run'}", "batch_size=32", "epochs=12", *TINY])
    metrics = Trainer(cfg).run()
    classes = len(dataset_info(synth)["classes"])
    chance = 100.0 / classes
    print(f"\nlargest-shape classification on held-out images: {metrics['val/shapes/accuracy']:.1f}% "
          f"(chance {chance:.1f}%)")
    assert metrics["val/shapes/accuracy"] > 3 * chance
    state = torch.load(next((tmp_path / "run" / "checkpoints").glob("step-*")) / "state.pt", weights_only=True)
    assert any(k.endswith("head.weight") for k in state["tasks"][0])  # the task's head is checkpointed


def test_two_gloo_processes_match_one_on_a_multitask_run(synth, synth_vqa, tmp_path):
    """DDP with 2 gloo processes on CPU, retrieval + VQA round robin: the losses of 1 process with the same
    global batch (relative tolerance 1e-4: float32 reductions in another order)."""
    import subprocess
    import sys

    from tests.test_train_distributed import free_port

    path = tmp_path / "multi.yaml"
    path.write_text(MULTI.format(path=path, a=synth, b=synth_vqa, strategy="round_robin"))
    common = ["max_steps=6", "eval_every=6", "save_every=6"]
    one = run_cli("train", path, f"output_dir={tmp_path / 'one'}", *common)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                          "-m", "vlkit", "train", str(path), f"output_dir={tmp_path / 'two'}", *common],
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert b[step][1] == a[step][1]
        assert b[step][0] == pytest.approx(a[step][0], rel=1e-4), step
