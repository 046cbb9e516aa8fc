"""Optimizers and schedules chosen in the config, each checked against its closed form; their config keys;
early stopping; exact resume with a non-default optimizer and schedule."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from torch import nn

from vlkit.config.load import ConfigError, load_config
from vlkit.config.schema import EarlyStopConfig, OptimConfig
from vlkit.errors import VlkitError
from vlkit.train.early_stop import EarlyStopping
from vlkit.train.optim import build_optimizer, build_scheduler, lr_factor
from vlkit.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

# ---------------------------------------------------------------- schedules: closed forms

W, T = 4, 24  # warmup steps, total steps
STEPS = [0, 1, 3, 4, 5, 9, 14, 23]


def closed_form(name: str, t: int) -> float:
    """The multiplier at 0-based step t, written out per schedule (W=4, T=24, and the settings of SETTINGS)."""
    if t < W:
        return (t + 1) / W
    s, n = t - W, T - W
    if name == "cosine":  # min_lr_ratio 0.2
        return 0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * s / n))
    if name == "linear":  # min_lr_ratio 0.2
        return 0.2 + 0.8 * (1 - s / n)
    if name == "polynomial":  # min_lr_ratio 0.2, power 2
        return 0.2 + 0.8 * (1 - s / n) ** 2
    if name == "constant":
        return 1.0
    if name == "step":  # step_every 3, gamma 0.5
        return 0.5 ** (s // 3)
    if name == "inverse_sqrt":  # timescale 7
        return math.sqrt(7 / (7 + s))
    raise AssertionError(name)


SETTINGS = {"cosine": {"min_lr_ratio": 0.2}, "linear": {"min_lr_ratio": 0.2},
            "polynomial": {"min_lr_ratio": 0.2, "power": 2.0}, "constant": {},
            "step": {"step_every": 3, "gamma": 0.5}, "inverse_sqrt": {"timescale": 7}}


class Towers(nn.Module):
    """Three groups of parameters: an image tower, a text tower and a head."""

    LR_GROUPS = {"image": ("img.",), "text": ("txt.",)}

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.img, self.txt, self.head = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x):
        return self.head(self.img(x) + self.txt(x))


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_schedule_matches_its_closed_form(name):
    cfg = OptimConfig(schedule=name, warmup_steps=W, lr_image=1e-3, lr_text=2e-3, lr_head=4e-3, **SETTINGS[name])
    for t in STEPS:
        assert lr_factor(t, cfg, T) == pytest.approx(closed_form(name, t), rel=1e-12), (name, t)
    # through the optimizer: every group at its own peak rate times the factor, step by step
    opt = build_optimizer(Towers(), cfg)
    sched = build_scheduler(opt, cfg, T)
    for t in range(T):
        if t in STEPS:
            for g in opt.param_groups:
                peak = {"image": 1e-3, "text": 2e-3, "head": 4e-3}[g["group"]]
                assert g["lr"] == pytest.approx(peak * closed_form(name, t), rel=1e-9), (name, t, g["group"])
        opt.step()
        sched.step()


def test_schedule_settings_change_the_rates():
    """A setting being ignored would leave these pairs equal."""
    base = OptimConfig(warmup_steps=W)
    pairs = [("cosine", "min_lr_ratio", 0.0, 0.5), ("polynomial", "power", 1.0, 3.0),
             ("step", "gamma", 0.1, 0.5), ("inverse_sqrt", "timescale", 2, 50)]
    for schedule, key, a, b in pairs:
        extra = {"step_every": 2} if schedule == "step" else {}
        ca = OptimConfig(**{**base.__dict__, "schedule": schedule, key: a, **extra})
        cb = OptimConfig(**{**base.__dict__, "schedule": schedule, key: b, **extra})
        assert lr_factor(15, ca, T) != pytest.approx(lr_factor(15, cb, T)), (schedule, key)
    short = OptimConfig(warmup_steps=2)
    assert lr_factor(1, short, T) == pytest.approx(1.0) and lr_factor(1, base, T) == pytest.approx(0.5)


# ---------------------------------------------------------------- optimizers: one or two steps in closed form

def _quadratic_step(opt, params, targets):
    """Gradient of 0.5 * sum((p - target)^2) * p_index-dependent weight: g = (p - target) * [1, 2, 3, ...]."""
    opt.zero_grad()
    loss = sum((0.5 * (p - t) ** 2 * torch.arange(1, p.numel() + 1, dtype=p.dtype)).sum()
               for p, t in zip(params, targets))
    loss.backward()
    opt.step()


def _grad(p, t):
    return (p - t) * torch.arange(1, p.numel() + 1, dtype=p.dtype)


def _vector_setup():
    torch.manual_seed(1)
    p = nn.Parameter(torch.randn(5, dtype=torch.float64))
    target = torch.randn(5, dtype=torch.float64)
    return p, target


def _groups(p, lr, wd):
    return [{"params": [p], "lr": lr, "initial_lr": lr, "weight_decay": wd, "group": "head", "names": ["p"]}]


def _build(name, groups, **kw):
    from vlkit.train.optimizers import create_optimizer

    return create_optimizer(groups, OptimConfig(name=name, **kw))


def test_sgd_nesterov_matches_closed_form():
    p, tgt = _vector_setup()
    x = p.detach().clone()
    lr, wd, mu = 0.05, 0.01, 0.7
    opt = _build("sgd", _groups(p, lr, wd), momentum=mu, nesterov=True)
    buf = None
    for _ in range(3):
        _quadratic_step(opt, [p], [tgt])
        g = _grad(x, tgt) + wd * x  # L2 weight decay added to the gradient
        buf = g.clone() if buf is None else mu * buf + g
        x = x - lr * (g + mu * buf)
    torch.testing.assert_close(p.detach(), x)


def test_adafactor_matches_closed_form():
    """Shazeer & Stern's update of a vector (not factored): beta2_t = 1 - t^c, U = g / sqrt(v), clipped by its
    RMS over d=1, step alpha = max(1e-3, RMS(x)) * min(lr, 1/sqrt(t)), decay x *= 1 - lr * wd first."""
    p, tgt = _vector_setup()
    x = p.detach().clone()
    lr, wd, c = 0.02, 0.1, -0.5
    opt = _build("adafactor", _groups(p, lr, wd), beta2_decay=c)
    v = torch.zeros_like(x)
    for t in range(1, 4):
        _quadratic_step(opt, [p], [tgt])
        g = _grad(x, tgt)
        alpha = max(1e-3, float(x.norm() / math.sqrt(x.numel()))) * min(lr, 1 / math.sqrt(t))
        x = x * (1 - lr * wd)
        beta2 = 1 - t ** c
        v = beta2 * v + (1 - beta2) * g * g
        u = g / v.sqrt()
        u = u / max(1.0, float(u.norm() / math.sqrt(u.numel())))
        x = x - alpha * u
    torch.testing.assert_close(p.detach(), x)


def test_lamb_matches_the_paper():
    """LAMB (You et al., algorithm 2, third version: no bias correction): r = m / (sqrt(v) + eps), u = r + wd * x,
    x -= lr * min(||x||, 10) / ||u|| * u."""
    pytest.importorskip("pytorch_optimizer")
    p, tgt = _vector_setup()
    x = p.detach().clone()
    lr, wd, (b1, b2), eps = 0.01, 0.05, (0.8, 0.9), 1e-6
    opt = _build("lamb", _groups(p, lr, wd), betas=(b1, b2), eps=eps)
    m = torch.zeros_like(x)
    v = torch.zeros_like(x)
    for _ in range(3):
        _quadratic_step(opt, [p], [tgt])
        g = _grad(x, tgt)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        u = m / (v.sqrt() + eps) + wd * x
        trust = min(float(x.norm()), 10.0) / (float(u.norm()) + eps)
        x = x - lr * trust * u
    torch.testing.assert_close(p.detach(), x)


@pytest.mark.parametrize("name", ["adamw", "sgd", "adafactor", "lamb"])
def test_every_optimizer_keeps_the_tower_rates(name):
    if name == "lamb":
        pytest.importorskip("pytorch_optimizer")
    cfg = OptimConfig(name=name, lr_image=1e-3, lr_text=2e-3, lr_head=4e-3, weight_decay=0.0)
    opt = build_optimizer(Towers(), cfg)
    assert {g["group"]: g["lr"] for g in opt.param_groups} == {"image": 1e-3, "text": 2e-3, "head": 4e-3}
    assert type(opt).__name__.lower() == {"adamw": "adamw", "sgd": "sgd", "adafactor": "adafactor",
                                          "lamb": "lamb"}[name]


def test_missing_lamb_package_is_one_clear_line(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pytorch_optimizer", None)  # import fails as when it is not installed
    with pytest.raises(VlkitError, match=r"optim.name=lamb needs the pytorch-optimizer package"):
        build_optimizer(Towers(), OptimConfig(name="lamb"))


# ---------------------------------------------------------------- config keys

def _problems(*overrides):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["datasets={d: {path: x}}", "tasks=[{name: retrieval, dataset: d}]", *overrides])
    return info.value.problems


def test_optim_keys_are_checked():
    assert _problems("optim.name=adam")[0].startswith("optim.name: 'adam' is not one of adafactor, adamw, lamb")
    assert _problems("optim.momentum=0.5")[0].startswith("optim.momentum: optimizer 'adamw' does not read it")
    assert _problems("optim.name=sgd", "optim.betas=[0.8, 0.9]")[0].startswith("optim.betas: optimizer 'sgd'")
    assert _problems("optim.name=sgd", "optim.nesterov=true", "optim.momentum=0")[0].startswith(
        "optim.nesterov: Nesterov momentum needs optim.momentum > 0")
    assert _problems("optim.schedule=step")[0].startswith("optim.step_every: schedule 'step' needs it")
    assert _problems("optim.schedule=constant", "optim.min_lr_ratio=0.1")[0].startswith(
        "optim.min_lr_ratio: schedule 'constant' does not read it")
    assert _problems("optim.schedule=inverse_sqrt", "optim.warmup_steps=0")[0].startswith("optim.timescale:")
    assert _problems("optim.gamma=0")[0].startswith("optim.gamma: must be between 0 and 1")
    assert _problems("optim.beta2_decay=0.5")[0].startswith("optim.beta2_decay: must be between -1 and 0")
    assert _problems("early_stop={metric: val/other/rsum}")[0].startswith("early_stop.metric: 'val/other/rsum'")
    assert _problems("early_stop={metric: val/d/rsum, mode: up}")[0].startswith("early_stop.mode: 'up' is not one")
    assert _problems("early_stop={metric: val/d/rsum}", "datasets.d.val_split=null")[0].startswith(
        "early_stop.metric: dataset d has no validation split")
    ok = load_config(None, ["datasets={d: {path: x}}", "tasks=[{name: retrieval, dataset: d}]", "optim.name=sgd",
                            "optim.nesterov=true", "optim.schedule=step", "optim.step_every=5",
                            "early_stop={metric: val/d/rsum, patience: 2}"])
    assert (ok.optim.name, ok.optim.step_every, ok.early_stop.patience) == ("sgd", 5, 2)


# ---------------------------------------------------------------- early stopping

def test_early_stopping_counts_evaluations_without_improvement():
    stop = EarlyStopping(EarlyStopConfig(metric="val/d/loss", patience=2, mode="min", min_delta=0.1))
    # 1.0 best; 0.95 is not better by more than 0.1; 0.8 is; then two evaluations without improvement
    assert [stop.update({"val/d/loss": v}, i) for i, v in enumerate([1.0, 0.95, 0.8, 0.75, 0.9])] == [
        False, False, False, False, True]
    assert (stop.best, stop.best_step, stop.bad_evals) == (0.8, 2, 2)
    again = EarlyStopping(stop.cfg)
    again.load_state_dict(stop.state_dict())
    assert again.state_dict() == stop.state_dict()
    with pytest.raises(VlkitError, match=r"early_stop.metric: the evaluation gave no 'val/d/loss'"):
        EarlyStopping(stop.cfg).update({"val/d/rsum": 1.0}, 0)


BASE = ["model.name=clip-tiny", "batch_size=32", "progress=false", "tensorboard=false", "log_every=1",
        "optim.lr_image=1e-3", "optim.lr_text=1e-3", "optim.lr_head=1e-3"]


def _cfg(synth, run, *extra):
    return load_config(None, [f"datasets={{synth: {{path: {synth}}}}}", "tasks=[{name: retrieval, dataset: synth}]",
                              f"output_dir={run}", *BASE, *extra])


def test_early_stop_ends_the_run_with_a_model(synth, tmp_path, capsys):
    # min_delta larger than any change: only the first evaluation counts as an improvement, so with
    # patience 2 and an evaluation every 2 steps the run stops after the evaluation at step 6
    run = tmp_path / "run"
    cfg = _cfg(synth, run, "max_steps=20", "eval_every=2", "save_every=10", "optim.warmup_steps=0",
               "early_stop={metric: val/synth/rsum, patience: 2, min_delta: 1000}")
    trainer = Trainer(cfg)
    trainer.run()
    assert trainer.global_step == 6 and trainer.stopped_early
    assert "early stop at step 6: val/synth/rsum has not improved" in capsys.readouterr().err
    assert (run / "model" / "model.safetensors").exists()
    assert (run / "checkpoints" / "step-00000006").is_dir()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 6
    # resumed, the run stays stopped
    resumed = Trainer(_cfg(synth, run, "max_steps=20", "eval_every=2", "save_every=10", "optim.warmup_steps=0",
                           "early_stop={metric: val/synth/rsum, patience: 2, min_delta: 1000}", "resume=latest"))
    resumed.run()
    assert resumed.global_step == 6


# ---------------------------------------------------------------- exact resume, SGD + step schedule

def _losses(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["train/loss"], r["train/lr"]) for r in rows if "train/loss" in r}


def test_resume_is_exact_with_sgd_and_a_step_schedule(synth, tmp_path):
    extra = ["max_steps=8", "save_every=4", "keep_last=3", "optim.name=sgd", "optim.nesterov=true",
             "optim.momentum=0.8", "optim.schedule=step", "optim.step_every=2", "optim.gamma=0.5",
             "optim.warmup_steps=2", "optim.lr_image=0.05", "optim.lr_text=0.05", "optim.lr_head=0.05"]
    full = tmp_path / "full"
    Trainer(_cfg(synth, full, *extra)).run()
    expected = _losses(full)
    assert [expected[s][1] for s in (1, 2, 3, 5, 7)] == pytest.approx([0.025, 0.05, 0.05, 0.025, 0.0125])
    # the same run resumed from its step-4 checkpoint: momentum buffers and the schedule's position restored
    copy = tmp_path / "copy"
    shutil.copytree(full, copy)
    shutil.rmtree(copy / "model")
    Trainer(_cfg(synth, copy, *extra, f"resume={copy / 'checkpoints' / 'step-00000004'}")).run()
    got = _losses(copy)
    assert sorted(got) == sorted(expected)
    for step in range(5, 9):
        assert got[step][0] == pytest.approx(expected[step][0], rel=1e-6, abs=1e-7), step
        assert got[step][1] == pytest.approx(expected[step][1], rel=1e-12), step
    # another optimizer cannot continue it
    with pytest.raises(VlkitError, match=r"trained with optimizer sgd, config has optim.name=adamw"):
        Trainer(_cfg(synth, copy, "max_steps=8", "resume=latest"))
