"""Gradient accumulation keeps contrastive negatives: N micro-batches give the loss and gradients of one
batch N times larger (gradient caching)."""

from __future__ import annotations

import contextlib

import pytest
import torch

import vlkit
from vlkit.config.schema import DatasetConfig, TaskConfig
from vlkit.models.preprocess import Preprocess
from vlkit.tasks.retrieval import RetrievalTask
from vlkit.train.distributed import DistInfo


def make_batch(n=8, length=6):
    torch.manual_seed(0)
    ids = torch.randint(4, 999, (n, length))
    ids[:, -1] = 999
    return {"image": torch.randn(n, 3, 32, 32), "input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("loss", ["contrastive", "siglip"])
@pytest.mark.parametrize("patch_dropout", [0.0, 0.5])
def test_accumulated_micro_batches_equal_one_big_batch(loss, patch_dropout):
    torch.manual_seed(1)
    model = vlkit.create_model("clip-tiny", patch_dropout=patch_dropout).train()
    task = RetrievalTask("d", TaskConfig(dataset="d", loss=loss), DatasetConfig(path="unused"), None, Preprocess(),
                         DistInfo())
    batch = make_batch()

    def run(micro):
        model.zero_grad(set_to_none=True)
        task.zero_grad(set_to_none=True)
        torch.manual_seed(7)  # the same random stream for patch dropout in both runs
        out = task.forward_backward(model, batch, micro, contextlib.nullcontext())
        grads = {n: p.grad.clone() for n, p in [*model.named_parameters(), *task.named_parameters()]
                 if p.grad is not None}
        return out["loss"], grads

    loss_full, grads_full = run(1)
    loss_acc, grads_acc = run(4)
    assert loss_acc == pytest.approx(loss_full, rel=1e-5)
    assert len(grads_full) > 10
    for name in grads_full.keys() | grads_acc.keys():  # a parameter the loss does not use may get a zero grad
        full = grads_full.get(name, torch.zeros_like(grads_acc.get(name, torch.zeros(()))))
        acc = grads_acc.get(name, torch.zeros_like(full))
        assert torch.allclose(acc, full, rtol=1e-4, atol=1e-5), name  # summation order differs
    if loss != "contrastive":
        return
    # the plain alternative (mean of per-micro-batch losses) is not the same: negatives are lost
    model.zero_grad(set_to_none=True)
    naive = sum(task.loss_from_embeddings(model, *(lambda o: (o.image_embeds, o.text_embeds))(
        model(batch["image"][i:i + 2], batch["input_ids"][i:i + 2]))).item() for i in range(0, 8, 2)) / 4
    assert abs(naive - loss_full) > 1e-3
