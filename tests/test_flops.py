"""FLOPs per sample against closed forms, peak lookups, MFU arithmetic, and MFU in the trainer's logs."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from torch import nn

import vlkit
from vlkit.train.mfu import measure_step_flops, step_head, step_mfu
from vlkit.utils import flops as F
from vlkit.utils.flops import (forward_flops_per_sample, mfu, peak_flops, synthetic_batch,
                               train_flops_per_sample)


def _sum_loss(model: nn.Module, batch) -> torch.Tensor:
    return model(batch[0]).sum()  # a sum costs no counted FLOPs


@pytest.mark.parametrize("input_grad", [True, False])
def test_linear_closed_form(input_grad):
    torch.manual_seed(0)
    b, d_in, d_out = 4, 16, 8
    layer = nn.Linear(d_in, d_out)
    x = torch.randn(b, d_in, requires_grad=input_grad)
    forward = 2 * b * d_in * d_out  # one multiply-add per weight per row
    assert forward_flops_per_sample(layer, (x,), loss_fn=_sum_loss) == forward / b
    # backward: the weight gradient (x^T dy) always, the input gradient (dy W) when the input needs one
    total = forward * (3 if input_grad else 2)
    assert train_flops_per_sample(layer, (x,), loss_fn=_sum_loss) == total / b


def _tower(tokens: int, width: int, layers: int, mlp: int) -> int:
    """Forward FLOPs of a pre-norm transformer whose last layer is computed for one (pooled) token only,
    as vlkit's ViT and CLIP text tower do. Attention scores are counted for every query-key pair (causal too)."""
    full = (2 * tokens * width * 3 * width  # q, k, v projections
            + 2 * tokens * tokens * width  # scores q k^T (summed over heads)
            + 2 * tokens * tokens * width  # weighted values
            + 2 * tokens * width * width  # output projection
            + 2 * 2 * tokens * width * mlp)  # MLP in and out
    last = (2 * tokens * width * 2 * width  # k, v for every token
            + 2 * width * width  # q of the pooled token
            + 2 * tokens * width * 2  # its scores and values
            + 2 * width * width  # output projection
            + 2 * 2 * width * mlp)  # MLP of one token
    return (layers - 1) * full + last


def test_clip_tiny_matches_analytic_count():
    model = vlkit.create_model("clip-tiny")
    c = model.config
    batch = synthetic_batch(model, batch_size=2)
    b, e = 2, c.embed_dim
    patches = (c.vision.image_size // c.vision.patch_size) ** 2
    vision = (2 * patches * 3 * c.vision.patch_size ** 2 * c.vision.width  # patch-embedding convolution
              + _tower(patches + 1, c.vision.width, c.vision.layers, int(4 * c.vision.width))
              + 2 * c.vision.width * e)  # projection
    text = (_tower(c.text.context_length, c.text.width, c.text.layers, int(4 * c.text.width))
            + 2 * c.text.width * e)
    loss = 2 * b * b * e / b  # the [batch, batch] similarity matrix, per sample
    expected = vision + text + loss
    measured = forward_flops_per_sample(model, batch)
    assert measured == pytest.approx(expected, rel=0.02)
    total = train_flops_per_sample(model, batch)
    assert 2.5 < total / measured < 3.5  # backward is about twice the forward


def test_measuring_leaves_model_and_rng_unchanged():
    model = vlkit.create_model("albef-tiny")  # momentum encoders and queues (buffers the step writes)
    model.eval()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5) if p.ndim else None
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    grads = {k: (v.grad, None if v.grad is None else v.grad.clone()) for k, v in model.named_parameters()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    states = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()

    first = train_flops_per_sample(model, synthetic_batch(model))
    assert first > 0 and train_flops_per_sample(model, synthetic_batch(model)) == first  # repeatable
    assert random.getstate() == states[0]
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])
    for name, p in model.named_parameters():
        assert torch.equal(p, params[name]), name
        grad, value = grads[name]
        assert p.grad is grad and (grad is None or torch.equal(grad, value)), name
    for name, buf in model.named_buffers():
        assert torch.equal(buf, buffers[name]), name
    assert not any(m.training for m in model.modules())


@pytest.mark.parametrize("name", ["clip-tiny", "albef-tiny", "vilt-tiny", "brivl-tiny"])
def test_every_family_is_counted(name):
    model = vlkit.create_model(name)
    batch = synthetic_batch(model)
    forward, total = forward_flops_per_sample(model, batch), train_flops_per_sample(model, batch)
    assert 0 < forward < total


def test_step_head():
    clip, albef, vilt = (vlkit.create_model(n) for n in ("clip-tiny", "albef-tiny", "vilt-tiny"))
    assert step_head(clip, ["retrieval"]) == "contrastive"
    assert step_head(albef, ["retrieval"]) == "contrastive"
    assert step_head(albef, ["retrieval", "itm"]) == "pretrain"
    assert step_head(vilt, ["itm"]) == "pretrain"


@pytest.mark.parametrize("device_name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.4e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989.4e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100 80GB PCIe", 312e12), ("NVIDIA L4", 121e12),
    ("NVIDIA A10", 125e12), ("NVIDIA A10G", None), ("NVIDIA L40S", None), ("NVIDIA H100 NVL", None),
    ("NVIDIA GeForce RTX 4090", None),
])
def test_peak_table(monkeypatch, device_name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: device_name)
    assert peak_flops(torch.device("cuda", 0)) == peak
    assert peak_flops("cuda", override=5e14) == 5e14


def test_peak_on_cpu():
    assert peak_flops("cpu") is None
    assert peak_flops(torch.device("cpu"), override=1e12) == 1e12
    if not torch.cuda.is_available():
        assert peak_flops() is None


def test_mfu_arithmetic():
    assert mfu(2e9, 100.0, 1e12) == pytest.approx(0.2)
    assert mfu(2e9, 100.0, None) is None
    # global samples/s over 4 devices of 1e12 each; two tasks per step double the work
    assert step_mfu(2e9, 100.0, 1e12, world_size=4) == pytest.approx(0.05)
    assert step_mfu(2e9, 100.0, 1e12, world_size=4, tasks_per_step=2) == pytest.approx(0.1)
    assert step_mfu(None, 100.0, 1e12, 1) is None and step_mfu(2e9, 100.0, None, 1) is None


def test_measure_failure_warns_and_skips(monkeypatch):
    from vlkit.config.load import load_config

    def broken(*args, **kwargs):
        raise RuntimeError("no counting here")

    monkeypatch.setattr("vlkit.train.mfu.train_flops_per_sample", broken)
    cfg = load_config(None, ["datasets={d: {path: x}}", "tasks=[{name: retrieval, dataset: d}]"])
    with pytest.warns(UserWarning, match="no counting here"):
        assert measure_step_flops(vlkit.create_model("clip-tiny"), cfg, torch.device("cpu")) is None


def test_trainer_logs_flops_and_mfu(synth, tmp_path):
    from vlkit.config.load import load_config
    from vlkit.train.trainer import Trainer

    run = tmp_path / "run"
    cfg = load_config(None, [f"datasets={{synth: {{path: {synth}}}}}", "tasks=[{name: retrieval, dataset: synth}]",
                             f"output_dir={run}", "model.name=clip-tiny", "batch_size=16", "max_steps=3",
                             "log_every=1", "progress=false", "tensorboard=false", "peak_flops=1e12"])
    trainer = Trainer(cfg)
    assert trainer.flops_per_sample == train_flops_per_sample(trainer.model, synthetic_batch(trainer.model))
    trainer.run()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "train/samples_per_s" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    flops = steps[0]["train/flops_per_sample"]
    assert flops > 0 and all("train/flops_per_sample" not in r for r in steps[1:])
    for r in steps:
        assert r["train/mfu"] == pytest.approx(flops * r["train/samples_per_s"] / 1e12, rel=1e-9)


def test_extra_formulas_cover_cpu_attention():
    ops = F._extra_formulas()
    assert all("flash_attention_for_cpu" in str(op) for op in ops)


def test_video_classifier_step_is_counted_on_clips():
    """A TimeSformer (clips in, class logits out) is counted on random clips of its frame count and size."""
    import warnings

    from vlkit.config.load import load_config
    from vlkit.utils.flops import forward_flops_per_sample

    cfg = load_config(None, ["datasets={d: {path: x}}", "tasks=[{name: video_classification, dataset: d}]",
                             "model.name=timesformer-tiny"])
    counts = {}
    for frames in (4, 8):
        model = vlkit.create_model("timesformer-tiny", frames=frames, layers=1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "could not count" warning
            counts[frames] = measure_step_flops(model, cfg, torch.device("cpu"))
        clips = [torch.randn(2, frames, 3, 32, 32)]
        forward = forward_flops_per_sample(model, clips, loss_fn=lambda m, b: m(b[0]).sum())
        assert 2.0 * forward < counts[frames] <= 3.0 * forward  # backward: about twice the forward
    # the linear layers' work grows with the frames; attention over 16 patches per frame adds a little
    assert 1.9 < counts[8] / counts[4] < 2.3
