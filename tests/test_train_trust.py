"""Training must not be silently wrong: every configured rate is applied and logged."""

from __future__ import annotations

import json

import pytest
import torch

from vlkit.config.load import load_config
from vlkit.errors import VlkitError
from vlkit.train.distributed import unwrap
from vlkit.train.trainer import Trainer

RATES = {"image": 1e-4, "text": 3e-4, "head": 2e-3}
# weight decay 0 and no warmup: AdamW's first step moves each weight by lr * g / (|g| + eps), ~lr where |g| >> eps
EXACT_STEP = ["progress=false", "tensorboard=false", "log_every=1", "batch_size=8", "max_steps=1",
              "optim.warmup_steps=0", "optim.weight_decay=0", "optim.eps=1e-12", "optim.grad_clip=null",
              *(f"optim.lr_{group}={lr}" for group, lr in RATES.items())]


def _trainer(synth, tmp_path, model: str, task: str) -> Trainer:
    cfg = load_config(None, [f"datasets={{synth: {{path: {synth}}}}}", f"tasks=[{task}]",
                             f"output_dir={tmp_path / 'run'}", f"model.name={model}", *EXACT_STEP])
    return Trainer(cfg)


def _check_rates_applied(trainer: Trainer, logs: dict[str, float], before: dict[int, torch.Tensor]) -> None:
    """Each group holds its configured rate and each parameter moved by its own rate on the first step."""
    seen_groups = set()
    for group in trainer.optimizer.param_groups:
        lr = RATES[group["group"]]
        assert group["initial_lr"] == pytest.approx(lr)
        seen_groups.add(group["group"])
        for name, p in zip(group["names"], group["params"]):
            if p.grad is None or not p.grad.abs().max() > 0:
                continue  # a parameter this batch gave no gradient does not move
            moved = (p.detach() - before[id(p)]).abs().max().item()
            # the weight with the largest |gradient| moves by lr (AdamW, step 1); the clamp of the logit scale aside
            assert moved == pytest.approx(lr, rel=0.02), (name, group["group"], moved, lr)
    assert seen_groups == set(RATES)
    for group in seen_groups:
        assert logs[f"train/lr_{group}"] == pytest.approx(RATES[group])
    assert logs["train/lr"] == pytest.approx(RATES["head"])


@pytest.mark.parametrize("model, task", [
    ("clip-tiny", "{name: retrieval, dataset: synth}"),
    # the classification task holds the model: its parameters must keep their tower's rate, its head lr_head
    ("albef-tiny", "{name: classification, dataset: synth, prompt: 'which shape?'}"),
])
def test_each_tower_trains_at_its_own_rate(synth, tmp_path, model, task):
    trainer = _trainer(synth, tmp_path, model, task)
    inner = unwrap(trainer.model)
    names = {name for g in trainer.optimizer.param_groups for name in g["names"]}
    groups = {name: g["group"] for g in trainer.optimizer.param_groups for name in g["names"]}
    for prefix, tower in [(prefixes[0], tower) for tower, prefixes in inner.LR_GROUPS.items()]:
        assert any(groups[n] == tower for n in names if n.startswith(prefix)), prefix
    params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    assert len(params) == len({id(p) for p in params})  # a parameter the task shares with the model: once
    trainable = {id(p) for m in (inner, *trainer.tasks) for p in m.parameters() if p.requires_grad}
    assert {id(p) for p in params} == trainable
    before = {id(p): p.detach().clone() for p in params}
    batch = next(iter(trainer.loaders[0]))
    logs = trainer.train_step([batch])
    _check_rates_applied(trainer, logs, before)


def test_every_group_rate_is_logged(synth, tmp_path):
    trainer = _trainer(synth, tmp_path, "clip-tiny", "{name: retrieval, dataset: synth}")
    trainer.run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    step1 = next(r for r in rows if r["step"] == 1 and "train/loss" in r)
    for group, lr in RATES.items():
        assert step1[f"train/lr_{group}"] == pytest.approx(lr)
    assert step1["train/lr"] == pytest.approx(RATES["head"])


def test_a_group_without_trainable_parameters_is_not_logged(synth, tmp_path):
    cfg = load_config(None, [f"datasets={{synth: {{path: {synth}}}}}", "tasks=[{name: retrieval, dataset: synth}]",
                             f"output_dir={tmp_path / 'run'}", "model.name=clip-tiny", "model.lock.tower=image",
                             *EXACT_STEP])
    trainer = Trainer(cfg)
    logs = trainer.train_step([next(iter(trainer.loaders[0]))])
    assert "train/lr_image" not in logs
    assert logs["train/lr_text"] == pytest.approx(RATES["text"])


def test_plot_draws_every_group_rate_in_one_panel(tmp_path):
    pytest.importorskip("matplotlib")
    from vlkit.train.plots import _panels, plot_run, read_metrics

    lines = []
    for step in range(1, 41):
        scale = min(1.0, step / 10)
        lines.append({"step": step, "train/loss": 3.0 / step, "train/lr": 2e-3 * scale,
                      **{f"train/lr_{g}": lr * scale for g, lr in RATES.items()}})
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    panels = _panels(read_metrics(tmp_path / "metrics.jsonl"))
    rate_panels = [p for p in panels if any(s.key.startswith("train/lr") for s in p.series)]
    assert len(rate_panels) == 1  # 1e-4 beside 2e-3: one panel, not split by magnitude
    assert [s.key for s in rate_panels[0].series] == ["train/lr_image", "train/lr_text", "train/lr_head"]
    assert rate_panels[0].title == "train · lr"
    assert plot_run(tmp_path).exists()


def _nan_at(trainer: Trainer, call: int) -> None:
    """Make the ``call``-th training batch of the first task all NaN (a corrupt or diverging step)."""
    task, calls = trainer.tasks[0], []
    original = task.forward_backward

    def forward_backward(model, batch, *args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            batch = {**batch, "image": torch.full_like(batch["image"], float("nan"))}
        return original(model, batch, *args, **kwargs)

    task.forward_backward = forward_backward


NAN_RUN = ["progress=false", "tensorboard=false", "log_every=1", "batch_size=8", "max_steps=3", "save_every=1",
           "optim.warmup_steps=0", "model.name=clip-tiny"]


def _nan_trainer(synth, tmp_path, *more: str) -> Trainer:
    cfg = load_config(None, [f"datasets={{synth: {{path: {synth}}}}}", "tasks=[{name: retrieval, dataset: synth}]",
                             f"output_dir={tmp_path / 'run'}", *NAN_RUN, *more])
    return Trainer(cfg)


def test_a_non_finite_loss_stops_the_run_before_its_update(synth, tmp_path):
    trainer = _nan_trainer(synth, tmp_path)
    _nan_at(trainer, 2)
    inner = unwrap(trainer.model)
    seen = {}
    original_save = trainer.save

    def save(best=False):  # the weights of the last good step, to compare with what the error leaves
        original_save(best)
        seen.update({k: v.clone() for k, v in inner.state_dict().items()})

    trainer.save = save
    with pytest.raises(VlkitError) as excinfo:
        trainer.run()
    message = str(excinfo.value)
    good = tmp_path / "run" / "checkpoints" / "step-00000001"
    assert message.startswith("step 2: the loss of task retrieval on dataset synth is nan")
    assert f"last good checkpoint: {good}" in message and "nonfinite=skip" in message
    for key, value in inner.state_dict().items():  # the NaN step was not applied
        assert torch.equal(value, seen[key]), key
    assert all(torch.isfinite(p).all() for p in inner.parameters())


def test_a_non_finite_loss_at_the_first_step_has_no_checkpoint_yet(synth, tmp_path):
    trainer = _nan_trainer(synth, tmp_path)
    _nan_at(trainer, 1)
    with pytest.raises(VlkitError, match=r"^step 1: .* \(last good checkpoint: none yet\)"):
        trainer.run()


def test_skip_drops_the_non_finite_step_and_counts_it(synth, tmp_path):
    trainer = _nan_trainer(synth, tmp_path, "nonfinite=skip")
    _nan_at(trainer, 2)
    inner = unwrap(trainer.model)
    trainer.run()
    assert all(torch.isfinite(p).all() for p in inner.parameters())
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    skipped = {r["step"]: r["train/skipped_steps"] for r in rows if "train/skipped_steps" in r}
    assert skipped == {1: 0, 2: 1, 3: 1}
    assert trainer.global_step == 3 and trainer.optimizer.state_dict()["state"]  # the other steps trained
    step = next(iter(trainer.optimizer.state_dict()["state"].values()))["step"]
    assert float(step) == 2  # AdamW took 2 of the 3 steps

    # the count is part of the run's state: a resumed run goes on counting from it
    cfg = load_config(None, [f"datasets={{synth: {{path: {synth}}}}}", "tasks=[{name: retrieval, dataset: synth}]",
                             f"output_dir={tmp_path / 'run'}", *NAN_RUN, "nonfinite=skip", "resume=latest",
                             "max_steps=4"])
    resumed = Trainer(cfg)
    assert resumed.skipped_steps == 1
    resumed.run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/skipped_steps"] for r in rows if r["step"] == 4 and "train/skipped_steps" in r] == [1]


def test_a_non_finite_gradient_stops_the_run_even_without_clipping(synth, tmp_path):
    """A finite loss whose gradient overflowed: caught by the gradient norm, measured also when not clipping."""
    trainer = _nan_trainer(synth, tmp_path, "optim.grad_clip=null")
    task, calls = trainer.tasks[0], []
    original = task.forward_backward
    inner = unwrap(trainer.model)
    victim = next(p for p in inner.parameters() if p.requires_grad)

    def forward_backward(model, batch, *args, **kwargs):
        out = original(model, batch, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            victim.grad.view(-1)[0] = float("inf")
        return out

    task.forward_backward = forward_backward
    with pytest.raises(VlkitError, match=r"^step 2: the gradient norm is inf; training stopped"):
        trainer.run()
    assert all(torch.isfinite(p).all() for p in inner.parameters())


def test_nonfinite_must_be_stop_or_skip():
    with pytest.raises(VlkitError, match="nonfinite: 'ignore' is not one of skip, stop"):
        load_config(None, ["datasets={d: {path: x}}", "tasks=[{name: retrieval, dataset: d}]", "nonfinite=ignore"])


def test_a_missing_val_split_fails_before_anything_is_written(synth, tmp_path):
    from vlkit.tasks.preflight import DatasetCheckError

    run = tmp_path / "out" / "run"
    cfg = load_config(None, [f"datasets={{synth: {{path: {synth}, val_split: nosuch}}}}",
                             "tasks=[{name: retrieval, dataset: synth}]", f"output_dir={run}", *EXACT_STEP,
                             "model.name=clip-tiny"])
    with pytest.raises(DatasetCheckError) as excinfo:
        Trainer(cfg)
    assert excinfo.value.problems == [
        f"datasets.synth.val_split: split 'nosuch' has no rows in {synth} (splits present: test, train, val)"]
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def unlabelled(tmp_path_factory):
    """A dataset with captions only: no labels, questions or answers."""
    from vlkit.data.ingest import ingest
    from vlkit.data.synth import generate

    root = tmp_path_factory.mktemp("plain")
    source = generate(root, 20, seed=1)
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    keep = ("image", "text")
    source.write_text("".join(json.dumps({k: r[k] for k in keep}) + "\n" for r in rows))
    ingest([source], root / "plain.lance", progress=False, val_fraction=0.3, test_fraction=0.0)
    return root / "plain.lance"


def test_every_dataset_problem_is_reported_at_once(synth, unlabelled, tmp_path):
    from vlkit.tasks.preflight import DatasetCheckError

    missing = tmp_path / "nothing.lance"
    cfg = load_config(None, [
        f"datasets={{gone: {{path: {missing}}}, plain: {{path: {unlabelled}}}, "
        f"shapes: {{path: {synth}, train_split: trian}}}}",
        "tasks=[{name: retrieval, dataset: gone}, {name: classification, dataset: plain, prompt: 'which?'}, "
        "{name: vqa, dataset: plain}, {name: retrieval, dataset: shapes}]",
        "sampling.strategy=round_robin", "model.name=albef-tiny", f"output_dir={tmp_path / 'run'}", "batch_size=8"])
    with pytest.raises(DatasetCheckError) as excinfo:
        Trainer(cfg)
    problems = excinfo.value.problems
    assert problems[0] == f"datasets.gone.path: {missing}: no such dataset (create one with " \
                          f"'vlkit ingest ... --out {missing}')"
    for split, role in (("train", "train_split"), ("val", "val_split")):
        for column, task in (("label", "classification"), ("questions", "vqa"), ("answers", "vqa")):
            assert (f"datasets.plain.{role}: column '{column}' is empty in split '{split}' of {unlabelled}; "
                    f"task {task} reads it") in problems
    assert (f"datasets.shapes.train_split: split 'trian' has no rows in {synth} "
            f"(splits present: test, train, val)") in problems
    assert len(problems) == 8  # and nothing else: the captions of `plain` are fine
    assert not (tmp_path / "run").exists()
    assert str(excinfo.value).splitlines()[1:] == problems


def test_every_task_declares_the_columns_it_reads():
    from vlkit.config.schema import TaskConfig
    from vlkit.tasks.preflight import task_reads

    assert task_reads(TaskConfig(name="retrieval", dataset="d")) == ["captions"]
    assert task_reads(TaskConfig(name="itm", dataset="d")) == ["captions"]
    assert task_reads(TaskConfig(name="vqa", dataset="d")) == ["questions", "answers"]
    assert task_reads(TaskConfig(name="classification", dataset="d")) == ["label", "captions"]
    assert task_reads(TaskConfig(name="classification", dataset="d", prompt="which?")) == ["label"]


def test_a_dataset_with_a_missing_data_file_fails_before_the_first_step(unlabelled, tmp_path):
    import shutil

    from vlkit.tasks.preflight import DatasetCheckError

    damaged = tmp_path / "damaged.lance"
    shutil.copytree(unlabelled, damaged)
    victim = sorted((damaged / "data").iterdir())[0]
    victim.unlink()
    run = tmp_path / "run"
    cfg = load_config(None, [f"datasets={{d: {{path: {damaged}}}}}", "tasks=[{name: retrieval, dataset: d}]",
                             f"output_dir={run}", *EXACT_STEP, "model.name=clip-tiny"])
    with pytest.raises(DatasetCheckError) as excinfo:
        Trainer(cfg)
    assert len(excinfo.value.problems) == 1
    assert excinfo.value.problems[0].startswith(f"datasets.d.path: {damaged}: the dataset is damaged: data file "
                                                f"{victim.name} is missing")
    assert not run.exists()
