"""The captioning task's step: micro-batches (grad_accum) give the loss and gradients of the whole batch, the
prompt is given but not scored, and label smoothing changes the loss as cross-entropy's own smoothing does."""

from __future__ import annotations

import contextlib

import pytest
import torch

from vlkit.config.schema import DatasetConfig, TaskConfig
from vlkit.data.text import build_word_tokenizer
from vlkit.models.registry import create_model
from vlkit.tasks.captioning import CaptioningTask
from vlkit.train.distributed import DistInfo

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(synth):
    from vlkit.data.store import open_dataset, split_indices

    ds = open_dataset(synth)
    captions = ds.take(split_indices(ds, "train"), columns=["captions"]).column("captions").to_pylist()
    tokenizer = build_word_tokenizer([c for row in captions for c in row] + ["a picture of"], max_length=32)
    torch.manual_seed(0)
    model = create_model("captioner-tiny", vocab_size=tokenizer.vocab_size)
    return synth, tokenizer, model


def _task(setup, **cfg) -> tuple[CaptioningTask, dict]:
    synth, tokenizer, model = setup
    task = CaptioningTask("synth", TaskConfig(name="captioning", dataset="synth", **cfg), DatasetConfig(path=str(synth)),
                          tokenizer, model.preprocess, DistInfo(), augment=False)
    ds = task.dataset("train", train=True)
    ds.set_epoch(0)
    task.train_set = ds
    return task, ds.__getitems__(list(range(6)))


def _grads(task, model, batch, micro_batches: int) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logs = task.forward_backward(model, batch, micro_batches, contextlib.nullcontext())
    return logs["caption_loss"], [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("micro_batches", [2, 3, 4])
def test_micro_batches_give_the_whole_batch_loss_and_gradients(setup, micro_batches):
    """Captions of different lengths: each micro-batch counts by its share of the batch's predicted tokens, so
    the loss and gradients equal one pass over the whole batch (4 micro-batches of 6 rows: sizes 2, 2, 2)."""
    _, _, model = setup
    task, batch = _task(setup, label_smoothing=0.1)
    assert len({len(t.split()) for t in batch["text"]}) > 1  # ragged captions, or the test shows nothing
    loss, grads = _grads(task, model, batch, 1)
    loss_k, grads_k = _grads(task, model, batch, micro_batches)
    assert loss_k == pytest.approx(loss, rel=1e-5)
    assert len(grads) == len(grads_k)
    for g, g_k in zip(grads, grads_k):
        torch.testing.assert_close(g_k, g, rtol=1e-4, atol=1e-6)


def test_prompt_is_given_not_scored_and_smoothing_is_cross_entropys(setup):
    import torch.nn.functional as F

    from vlkit.inference.captions import caption_inputs
    from vlkit.modules.losses.captioning import caption_labels

    _, tokenizer, model = setup
    task, batch = _task(setup, prompt="a picture of", label_smoothing=0.2)
    tokens = caption_inputs(tokenizer, model.generation, batch["text"], "a picture of")
    assert tokens.prompt_length == 3
    assert (tokens.input_ids[:, 1:4] == torch.tensor(tokenizer.encode_plain("a picture of"))).all()
    labels = caption_labels(tokens.input_ids, tokens.attention_mask, tokens.prompt_length)
    assert (labels[:, :3] == -100).all() and (labels[:, 3] == tokens.input_ids[:, 4]).all()
    with torch.no_grad():
        logits = model(batch["image"], tokens.input_ids, tokens.attention_mask, head="caption")
    keep = labels != -100
    expected = F.cross_entropy(logits[keep], labels[keep], label_smoothing=0.2)  # the reference
    loss, _ = _grads(task, model, batch, 1)
    assert loss == pytest.approx(float(expected), rel=1e-5)
