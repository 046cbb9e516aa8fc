"""The vector-quantisation codebook: straight-through gradients, nearest codes, EMA updates, dead-code restarts."""

from __future__ import annotations

import math

import pytest
import torch

from vlkit.modules.layers.codebook import Codebook, code_statistics, nearest_codes

pytestmark = pytest.mark.usefixtures("one_thread")


def test_gradient_passes_straight_through():
    torch.manual_seed(0)
    book = Codebook(8, 4, restart_after=0)
    z = torch.randn(3, 5, 4, requires_grad=True)
    weight = torch.randn(3, 5, 4)
    out = book(z)
    (out.quantized * weight).sum().backward()
    # the reference: the same loss on the identity map, whose gradient autograd computes
    ident = z.detach().clone().requires_grad_(True)
    (ident * weight).sum().backward()
    assert torch.equal(z.grad, ident.grad)
    # while the value is the chosen code, not the input
    assert torch.allclose(out.quantized, book.embedding[out.ids])
    assert not torch.allclose(out.quantized, z)


def test_nearest_code_matches_slow_loop():
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(40, 6, generator=gen)
    codes = torch.randn(11, 6, generator=gen)
    expected = []
    for row in z.tolist():
        dists = [sum((a - b) ** 2 for a, b in zip(row, code)) for code in codes.tolist()]
        expected.append(min(range(len(dists)), key=dists.__getitem__))
    assert nearest_codes(z, codes).tolist() == expected
    book = Codebook(11, 6, restart_after=0).eval()
    book.embedding.copy_(codes)
    assert book(z[None]).ids[0].tolist() == expected


def test_ema_update_matches_hand_computation():
    decay, eps = 0.9, 1e-3
    book = Codebook(3, 2, decay=decay, eps=eps, restart_after=0)
    start = [[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]
    book.embedding.copy_(torch.tensor(start))
    book.embed_sum.copy_(torch.tensor(start))
    z = torch.tensor([[1.0, 0.5], [-1.0, 0.5], [9.0, 1.0]])  # two vectors to code 0, one to code 1, none to 2
    out = book(z)
    assert out.ids.tolist() == [0, 0, 1]
    counts = [2.0, 1.0, 0.0]
    sums = [[0.0, 1.0], [9.0, 1.0], [0.0, 0.0]]
    n = [decay * 1.0 + (1 - decay) * c for c in counts]  # counts start at one per code
    s = [[decay * a + (1 - decay) * b for a, b in zip(row0, row1)] for row0, row1 in zip(start, sums)]
    total = sum(n)
    smoothed = [(nk + eps) / (total + 3 * eps) * total for nk in n]
    expected = [[v / smoothed[k] for v in s[k]] for k in range(3)]
    assert torch.allclose(book.cluster_size, torch.tensor(n))
    assert torch.allclose(book.embed_sum, torch.tensor(s))
    assert torch.allclose(book.embedding, torch.tensor(expected), atol=1e-6)
    # the codes are buffers under EMA: no parameter for an optimizer, and no codebook loss
    assert not list(book.parameters()) and float(out.codebook_loss) == 0.0
    # evaluation mode leaves them alone
    before = book.embedding.clone()
    book.eval()(z)
    assert torch.equal(book.embedding, before)


def test_codebook_loss_trains_codes_without_ema():
    book = Codebook(4, 3, ema=False, restart_after=0)
    z = torch.randn(10, 3)
    out = book(z)
    (out.codebook_loss + out.commitment_loss).backward()
    assert book.embedding.grad is not None and book.embedding.grad.abs().sum() > 0
    code = book.embedding.detach()[out.ids]
    assert math.isclose(float(out.codebook_loss.detach()), float(((code - z) ** 2).mean()), rel_tol=1e-5)
    assert math.isclose(float(out.commitment_loss.detach()), float(((code - z) ** 2).mean()), rel_tol=1e-5)


@pytest.mark.parametrize("ema", [True, False])
def test_dead_codes_restart_from_batch_vectors(ema):
    torch.manual_seed(0)
    book = Codebook(4, 2, ema=ema, restart_after=2)
    with torch.no_grad():
        book.embedding.copy_(torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0], [100.0, 100.0]]))
        if ema:
            book.embed_sum.copy_(book.embedding)
    z = torch.tensor([[0.1, 0.0], [5.0, 0.1], [0.0, 4.9], [0.2, 0.1]])
    first = book(z)
    assert first.ids.tolist() == [0, 1, 2, 0] and float(first.restarted) == 0
    assert book.unused_steps.tolist() == [0, 0, 0, 1]
    assert float(book.embedding.detach()[3, 0]) > 50  # not yet restarted: still far away
    second = book(z)
    assert float(second.restarted) == 1
    new_code = book.embedding[3].detach()
    assert any(torch.allclose(new_code, row) for row in z), "a dead code restarts from an input vector"
    assert book.unused_steps.tolist() == [0, 0, 0, 0]
    if ema:
        assert float(book.cluster_size[3]) == 1.0 and torch.allclose(book.embed_sum[3], new_code)
    # never in evaluation mode
    book.eval()
    book.unused_steps.fill_(10)
    assert float(book(z).restarted) == 0


def test_usage_and_perplexity_closed_form():
    usage, perplexity = code_statistics(torch.tensor([2.0, 2.0, 0.0, 0.0]))
    assert float(usage) == 0.5 and math.isclose(float(perplexity), 2.0, rel_tol=1e-6)
    usage, perplexity = code_statistics(torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]))
    assert float(usage) == 1.0 and math.isclose(float(perplexity), 8.0, rel_tol=1e-6)
    _, perplexity = code_statistics(torch.tensor([3.0, 1.0]))
    p = [0.75, 0.25]
    assert math.isclose(float(perplexity), math.exp(-sum(x * math.log(x) for x in p)), rel_tol=1e-6)
    book = Codebook(8, 2, restart_after=0).eval()
    out = book(book.embedding[[0, 0, 1, 2]] + 1e-4)
    assert math.isclose(float(out.usage), 3 / 8) and math.isclose(
        float(out.perplexity), math.exp(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))), rel_tol=1e-5)
