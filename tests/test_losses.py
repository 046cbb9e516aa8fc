"""Losses: contrastive (hard and grouped targets), SigLIP, momentum queues; single process."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlkit.modules.losses import (
    ContrastiveLoss,
    ContrastiveOutput,
    FeatureQueue,
    MomentumContrastiveLoss,
    SiglipLoss,
    contrastive_loss,
    gather_no_grad,
    gather_with_grad,
    make_momentum_copy,
    momentum_update,
    queue_contrastive_loss,
    siglip_loss,
)


def unit(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=-1)


# ---------------------------------------------------------------- contrastive


def test_contrastive_equals_cross_entropy_both_ways():
    img, txt = unit(6, 8, seed=1), unit(6, 8, seed=2)
    scale = torch.tensor(14.0)
    out = contrastive_loss(img, txt, scale)
    assert isinstance(out, ContrastiveOutput)
    logits = scale * img @ txt.T
    labels = torch.arange(6)
    torch.testing.assert_close(out.logits_per_image, logits)
    torch.testing.assert_close(out.image_to_text, F.cross_entropy(logits, labels))
    torch.testing.assert_close(out.text_to_image, F.cross_entropy(logits.T, labels))
    torch.testing.assert_close(out.loss, (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2)


def test_contrastive_label_smoothing_matches_cross_entropy():
    img, txt = unit(5, 4, seed=3), unit(5, 4, seed=4)
    out = contrastive_loss(img, txt, torch.tensor(10.0), label_smoothing=0.1)
    logits = 10.0 * img @ txt.T
    ref = (F.cross_entropy(logits, torch.arange(5), label_smoothing=0.1)
           + F.cross_entropy(logits.T, torch.arange(5), label_smoothing=0.1)) / 2
    torch.testing.assert_close(out.loss, ref)


def soft_reference(img, txt, scale, groups):
    """Hand-written soft-target cross-entropy, one row at a time."""
    logits = (scale * img @ txt.T).tolist()
    n = len(groups)

    def direction(rows):
        total = 0.0
        for i in range(n):
            pos = [j for j in range(n) if groups[j] == groups[i]]
            log_norm = math.log(sum(math.exp(v) for v in rows[i]))
            total += -sum((rows[i][j] - log_norm) / len(pos) for j in pos)
        return total / n

    cols = [[logits[j][i] for j in range(n)] for i in range(n)]
    i2t, t2i = direction(logits), direction(cols)
    return i2t, t2i, (i2t + t2i) / 2


def test_contrastive_group_ids_soft_targets_match_hand_reference():
    img, txt = unit(7, 5, seed=5, dtype=torch.float64), unit(7, 5, seed=6, dtype=torch.float64)
    groups = [3, 3, 1, 4, 3, 1, 9]
    out = contrastive_loss(img, txt, torch.tensor(12.0, dtype=torch.float64), torch.tensor(groups))
    i2t, t2i, loss = soft_reference(img, txt, 12.0, groups)
    assert out.image_to_text.item() == pytest.approx(i2t, rel=1e-12)
    assert out.text_to_image.item() == pytest.approx(t2i, rel=1e-12)
    assert out.loss.item() == pytest.approx(loss, rel=1e-12)


def test_distinct_group_ids_equal_hard_targets():
    img, txt = unit(6, 8, seed=7), unit(6, 8, seed=8)
    hard = contrastive_loss(img, txt, torch.tensor(20.0))
    soft = contrastive_loss(img, txt, torch.tensor(20.0), torch.tensor([10, 11, 12, 13, 14, 15]))
    torch.testing.assert_close(soft.loss, hard.loss)


def test_contrastive_rejects_misaligned_inputs():
    with pytest.raises(ValueError, match="row-aligned"):
        contrastive_loss(unit(4, 8), unit(5, 8), torch.tensor(1.0))
    with pytest.raises(ValueError, match="group_ids"):
        contrastive_loss(unit(4, 8), unit(4, 8), torch.tensor(1.0), torch.arange(3))


def test_contrastive_gradcheck_float64():
    img = unit(4, 3, seed=9, dtype=torch.float64).requires_grad_()
    txt = unit(4, 3, seed=10, dtype=torch.float64).requires_grad_()
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    groups = torch.tensor([0, 1, 0, 2])
    assert torch.autograd.gradcheck(lambda a, b, s: contrastive_loss(a, b, s).loss, (img, txt, scale))
    assert torch.autograd.gradcheck(lambda a, b, s: contrastive_loss(a, b, s, groups, 0.1).loss, (img, txt, scale))


def test_temperature_init_scale_and_clamp():
    loss = ContrastiveLoss(init_temperature=0.07)
    assert isinstance(loss.logit_scale, nn.Parameter)
    assert loss.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert loss.scale().item() == pytest.approx(1 / 0.07, rel=1e-6)

    hot = ContrastiveLoss(init_temperature=0.001, max_logit_scale=100.0)
    assert hot.scale().item() == pytest.approx(100.0)  # clamped multiplier
    hot.clamp_()
    assert hot.logit_scale.item() == pytest.approx(math.log(100.0))
    with torch.no_grad():
        hot.logit_scale.fill_(-3.0)
    hot.clamp_()
    assert hot.logit_scale.item() == 0.0

    fixed = ContrastiveLoss(learnable=False)
    assert "logit_scale" in dict(fixed.named_buffers()) and not list(fixed.parameters())
    with pytest.raises(ValueError):
        ContrastiveLoss(init_temperature=0.0)


def test_contrastive_module_forward_and_gradient_to_scale():
    loss = ContrastiveLoss()
    img, txt = unit(4, 8, seed=11), unit(4, 8, seed=12)
    out = loss(img, txt, torch.tensor([0, 0, 1, 2]))
    torch.testing.assert_close(out.loss, contrastive_loss(img, txt, loss.scale(), torch.tensor([0, 0, 1, 2])).loss)
    out.loss.backward()
    assert loss.logit_scale.grad is not None and torch.isfinite(loss.logit_scale.grad)


def test_gathers_are_identity_without_process_group():
    x = torch.randn(3, 2, requires_grad=True)
    assert gather_with_grad(x) is x
    assert gather_no_grad(x) is x


# ---------------------------------------------------------------- siglip


def slow_siglip(img, txt, scale, bias, groups=None):
    n = img.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = scale * float(img[i] @ txt[j]) + bias
            positive = (i == j) if groups is None else groups[i] == groups[j]
            label = 1.0 if positive else -1.0
            total += -math.log(1.0 / (1.0 + math.exp(-label * z)))
    return total / n


@pytest.mark.parametrize("groups", [None, [0, 1, 0, 2, 1]])
def test_siglip_matches_double_loop(groups):
    img, txt = unit(5, 6, seed=13, dtype=torch.float64), unit(5, 6, seed=14, dtype=torch.float64)
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    gid = None if groups is None else torch.tensor(groups)
    out = siglip_loss(img, txt, scale, bias, gid)
    assert out.logits.shape == (5, 5)
    assert out.loss.item() == pytest.approx(slow_siglip(img, txt, 10.0, -10.0, groups), rel=1e-12)


def test_siglip_module_init_and_gradients():
    loss = SiglipLoss()
    assert loss.logit_scale.item() == pytest.approx(math.log(10.0))
    assert loss.logit_bias.item() == -10.0
    img, txt = unit(4, 6, seed=15), unit(4, 6, seed=16)
    out = loss(img, txt)
    assert out.loss.item() == pytest.approx(slow_siglip(img.double(), txt.double(), 10.0, -10.0), rel=1e-5)
    out.loss.backward()
    assert loss.logit_scale.grad is not None and loss.logit_bias.grad is not None


# ---------------------------------------------------------------- momentum queue


def rows(start: int, count: int, dim: int = 3) -> torch.Tensor:
    """Rows whose first column is their global index, to follow them through the queue."""
    x = torch.zeros(count, dim)
    x[:, 0] = torch.arange(start, start + count, dtype=torch.float32)
    return x


def test_queue_initial_state():
    q = FeatureQueue(dim=4, size=6)
    assert q.features.shape == (6, 4)
    torch.testing.assert_close(q.features.norm(dim=1), torch.ones(6))
    assert q.ptr.item() == 0 and q.filled.item() == 0
    assert q.features_view(filled_only=True).shape == (0, 4)
    assert q.chronological().shape == (0, 4)
    assert {"features", "ptr", "filled"} <= set(q.state_dict())


def test_queue_wraps_around_in_order():
    q = FeatureQueue(dim=3, size=5)
    q.enqueue(rows(0, 2))  # slots 0,1
    assert q.ptr.item() == 2 and q.filled.item() == 2
    assert q.chronological()[:, 0].tolist() == [0, 1]
    q.enqueue(rows(2, 2))  # slots 2,3
    q.enqueue(rows(4, 2))  # slot 4, then wraps to slot 0 (overwrites row 0)
    assert q.ptr.item() == 1 and q.filled.item() == 5
    assert q.features[:, 0].tolist() == [5, 1, 2, 3, 4]
    assert q.chronological()[:, 0].tolist() == [1, 2, 3, 4, 5]
    q.enqueue(rows(6, 3))  # slots 1,2,3
    assert q.ptr.item() == 4
    assert q.features[:, 0].tolist() == [5, 6, 7, 8, 4]
    assert q.chronological()[:, 0].tolist() == [4, 5, 6, 7, 8]


def test_queue_batch_larger_than_queue_keeps_newest():
    q = FeatureQueue(dim=3, size=4)
    q.enqueue(rows(0, 1))
    q.enqueue(rows(1, 10))  # rows 1..10; only 7..10 survive
    assert q.filled.item() == 4
    assert q.ptr.item() == 11 % 4
    assert q.chronological()[:, 0].tolist() == [7, 8, 9, 10]
    # the storage is exactly what writing the 11 rows one by one would leave
    one_by_one = FeatureQueue(dim=3, size=4)
    for i in range(11):
        one_by_one.enqueue(rows(i, 1))
    torch.testing.assert_close(q.features, one_by_one.features)
    assert q.ptr.item() == one_by_one.ptr.item()


def test_queue_batch_equal_to_size_and_random_batches_match_one_by_one():
    q, ref = FeatureQueue(dim=3, size=7), FeatureQueue(dim=3, size=7)
    start = 0
    for count in [7, 3, 0, 9, 1, 13, 6, 2]:
        q.enqueue(rows(start, count))
        for i in range(count):
            ref.enqueue(rows(start + i, 1))
        start += count
        torch.testing.assert_close(q.features, ref.features)
        assert (q.ptr.item(), q.filled.item()) == (ref.ptr.item(), ref.filled.item())
    assert q.chronological()[:, 0].tolist() == list(range(start - 7, start))


def test_queue_views_are_detached_copies_and_checks_width():
    q = FeatureQueue(dim=3, size=4)
    x = torch.randn(2, 3, requires_grad=True)
    q.enqueue(x * 2)
    view = q.features_view()
    assert not view.requires_grad
    q.enqueue(rows(0, 4))
    assert not torch.equal(view, q.features)  # the earlier view kept its values
    assert q.features_view(filled_only=True).shape == (4, 3)
    with pytest.raises(ValueError, match=r"\[batch, 3\]"):
        q.enqueue(torch.zeros(2, 4))


def slow_queue_loss(img, txt, img_m, txt_m, img_q, txt_q, scale):
    """Concatenate by hand and take the cross-entropy of each row."""
    def direction(online, batch_m, queue):
        total = 0.0
        for i in range(online.shape[0]):
            candidates = [batch_m[j] for j in range(batch_m.shape[0])] + [queue[k] for k in range(queue.shape[0])]
            logits = [scale * float(online[i] @ c) for c in candidates]
            total += -(logits[i] - math.log(sum(math.exp(v) for v in logits)))
        return total / online.shape[0]

    i2t, t2i = direction(img, txt_m, txt_q), direction(txt, img_m, img_q)
    return i2t, t2i, (i2t + t2i) / 2


@pytest.mark.parametrize("queue_len", [0, 5])
def test_queue_contrastive_loss_matches_slow_reference(queue_len):
    d = torch.float64
    img, txt = unit(4, 6, seed=20, dtype=d), unit(4, 6, seed=21, dtype=d)
    img_m, txt_m = unit(4, 6, seed=22, dtype=d), unit(4, 6, seed=23, dtype=d)
    img_q, txt_q = unit(queue_len, 6, seed=24, dtype=d), unit(queue_len, 6, seed=25, dtype=d)
    out = queue_contrastive_loss(img, txt, img_m, txt_m, img_q, txt_q, torch.tensor(8.0, dtype=d))
    i2t, t2i, loss = slow_queue_loss(img, txt, img_m, txt_m, img_q, txt_q, 8.0)
    assert out.image_to_text.item() == pytest.approx(i2t, rel=1e-12)
    assert out.text_to_image.item() == pytest.approx(t2i, rel=1e-12)
    assert out.loss.item() == pytest.approx(loss, rel=1e-12)


def test_queue_contrastive_loss_no_grad_into_momentum_side():
    img, txt = unit(3, 4, seed=30).requires_grad_(), unit(3, 4, seed=31).requires_grad_()
    img_m, txt_m = unit(3, 4, seed=32).requires_grad_(), unit(3, 4, seed=33).requires_grad_()
    out = queue_contrastive_loss(img, txt, img_m, txt_m, unit(2, 4), unit(2, 4), torch.tensor(5.0))
    out.loss.backward()
    assert img.grad is not None and txt.grad is not None
    assert img_m.grad is None and txt_m.grad is None


def test_momentum_contrastive_module_uses_then_enqueues():
    torch.manual_seed(0)
    loss = MomentumContrastiveLoss(dim=6, queue_size=8)
    img, txt = unit(3, 6, seed=40).requires_grad_(), unit(3, 6, seed=41).requires_grad_()
    img_m, txt_m = unit(3, 6, seed=42), unit(3, 6, seed=43)
    img_q, txt_q = loss.image_queue.features_view(), loss.text_queue.features_view()
    out = loss(img, txt, img_m, txt_m)
    ref = queue_contrastive_loss(img, txt, img_m, txt_m, img_q, txt_q, loss.scale())
    torch.testing.assert_close(out.loss, ref.loss)
    out.loss.backward()  # the enqueue after the forward must not break the backward
    assert loss.logit_scale.grad is not None
    torch.testing.assert_close(loss.image_queue.chronological(), img_m)
    torch.testing.assert_close(loss.text_queue.chronological(), txt_m)


def test_momentum_contrastive_filled_only_starts_in_batch():
    loss = MomentumContrastiveLoss(dim=6, queue_size=8, filled_only=True)
    img, txt = unit(3, 6, seed=50), unit(3, 6, seed=51)
    img_m, txt_m = unit(3, 6, seed=52), unit(3, 6, seed=53)
    empty = torch.zeros(0, 6)
    first = loss(img, txt, img_m, txt_m)
    in_batch = queue_contrastive_loss(img, txt, img_m, txt_m, empty, empty, loss.scale())
    torch.testing.assert_close(first.loss, in_batch.loss)
    second = loss(img, txt, img_m, txt_m)  # now 3 queued rows per side
    ref = queue_contrastive_loss(img, txt, img_m, txt_m, img_m, txt_m, loss.scale())
    torch.testing.assert_close(second.loss, ref.loss)


def test_momentum_update_closed_form():
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    target = make_momentum_copy(online)
    assert all(not p.requires_grad for p in target.parameters())
    assert all(p.requires_grad for p in online.parameters())
    with torch.no_grad():
        for p in target.parameters():
            p.add_(torch.randn_like(p))
    start = {k: v.clone() for k, v in target.named_parameters()}
    online(torch.randn(8, 4))  # moves the batch-norm running statistics of the online model
    m, k = 0.9, 7
    for _ in range(k):
        momentum_update(online, target, m)
    for name, o in online.named_parameters():
        expected = o.detach() + m**k * (start[name] - o.detach())
        torch.testing.assert_close(dict(target.named_parameters())[name], expected, rtol=1e-6, atol=1e-6)
    for name, b in online.named_buffers():
        torch.testing.assert_close(dict(target.named_buffers())[name], b)


def test_momentum_update_validates():
    a, b = nn.Linear(2, 2), nn.Linear(2, 3, bias=False)
    with pytest.raises(ValueError, match="structure"):
        momentum_update(a, b, 0.9)
    with pytest.raises(ValueError, match="momentum"):
        momentum_update(a, make_momentum_copy(a), 1.5)
