"""TransformerTextDecoder: incremental decoding against the teacher-forced forward, the forward against a slow
loop over prefixes, padding and context masks, the tied head."""

from __future__ import annotations

import pytest
import torch

from vlkit.modules.decoders import TextDecoderConfig, TransformerTextDecoder, text_decoder
from vlkit.modules.layers.transformer import TransformerDecoderLayer, TransformerEncoderLayer


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (conftest)


def tiny(cross=None, tie=True, dtype=torch.float32) -> TransformerTextDecoder:
    torch.manual_seed(0)
    cfg = TextDecoderConfig(vocab_size=23, width=16, layers=3, heads=2, context_dim=12, max_length=12,
                            tie_word_embeddings=tie, cross_attention_layers=cross)
    dec = TransformerTextDecoder(cfg).to(dtype).eval()
    with torch.no_grad():  # peaky distributions, so that a wrong position or mask shows clearly
        dec.token_embedding.weight.normal_(std=1.0)
        dec.positional_embedding.normal_(std=1.0)
    return dec


@pytest.mark.parametrize("cross", [None, [1], [0, 2]])
def test_cached_steps_equal_teacher_forcing_at_every_position(cross):
    dec = tiny(cross)
    ctx = torch.randn(3, 5, 12)  # [batch, context, context_dim]
    ctx_mask = torch.ones(3, 5, dtype=torch.bool)
    ctx_mask[1, 3:] = False
    ids = torch.randint(0, 23, (3, 9))
    with torch.no_grad():
        full = dec(ids, ctx, context_mask=ctx_mask)  # [batch, length, vocab]
        cache = dec.start(ctx, ctx_mask, max_length=9)
        pieces = [dec.step(ids[:, :2], cache)]  # a prompt of two tokens, then one token at a time
        pieces += [dec.step(ids[:, t:t + 1], cache) for t in range(2, 9)]
    assert cache.length == 9
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


def test_forward_equals_a_slow_loop_over_prefixes():
    """Causality: the logits at position t depend only on tokens 0..t (each prefix run on its own)."""
    dec = tiny([0, 2], dtype=torch.float64)
    ctx, ids = torch.randn(2, 4, 12, dtype=torch.float64), torch.randint(0, 23, (2, 7))
    with torch.no_grad():
        full = dec(ids, ctx)
        slow = torch.stack([dec(ids[:, : t + 1], ctx)[:, -1] for t in range(7)], dim=1)
    torch.testing.assert_close(full, slow, rtol=1e-10, atol=1e-10)


def test_padding_does_not_change_real_positions():
    dec = tiny()
    ctx = torch.randn(3, 5, 12)
    lengths = [9, 4, 6]
    ids = torch.randint(0, 23, (3, 9))
    mask = (torch.arange(9)[None] < torch.tensor(lengths)[:, None]).long()
    ids_padded = ids.masked_fill(mask == 0, 0)
    with torch.no_grad():
        batch = dec(ids_padded, ctx, attention_mask=mask)
        for i, n in enumerate(lengths):
            alone = dec(ids[i : i + 1, :n], ctx[i : i + 1])
            torch.testing.assert_close(batch[i : i + 1, :n], alone, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(batch).all()


def test_masked_context_tokens_are_ignored():
    dec = tiny()
    ctx, ids = torch.randn(2, 5, 12), torch.randint(0, 23, (2, 6))
    ctx_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    other = ctx.clone()
    other[0, 3:] = 100.0  # changes only masked tokens
    with torch.no_grad():
        a = dec(ids, ctx, context_mask=ctx_mask)
        b = dec(ids, other, context_mask=ctx_mask)
        c = dec(ids, other)  # unmasked: the change must show
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a[0], c[0], atol=1e-3)


def test_tied_head_shares_the_embedding():
    dec = tiny()
    assert dec.lm_head.weight is dec.token_embedding.weight
    names = [n for n, _ in dec.named_parameters()]
    assert "lm_head.weight" not in names  # one parameter, counted once
    ctx, ids = torch.randn(1, 3, 12), torch.randint(0, 23, (1, 4))
    dec(ids, ctx).sum().backward()
    assert dec.token_embedding.weight.grad is not None
    h = dec.hidden_states(ids, ctx)  # the head is the embedding matrix: logits = h @ E^T
    torch.testing.assert_close(dec(ids, ctx), h @ dec.token_embedding.weight.T)
    untied = tiny(tie=False)
    assert untied.lm_head.weight.data_ptr() != untied.token_embedding.weight.data_ptr()


def test_layer_kinds_follow_cross_attention_layers():
    dec = tiny([1])
    kinds = [type(layer) for layer in dec.layers]
    assert kinds == [TransformerEncoderLayer, TransformerDecoderLayer, TransformerEncoderLayer]
    assert len(dec.start(torch.randn(2, 3, 12)).cross_kv) == 1
    with pytest.raises(ValueError, match="out of range"):
        text_decoder(10, 8, 2, 2, cross_attention_layers=[2])


def test_limits_of_the_positions():
    dec = tiny()
    ctx = torch.randn(1, 3, 12)
    with pytest.raises(ValueError, match="max_length"):
        dec.start(ctx, max_length=13)
    cache = dec.start(ctx, max_length=4)
    dec.step(torch.zeros(1, 4, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="overflow"):
        dec.step(torch.zeros(1, 1, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="max_length"):
        dec(torch.zeros(1, 13, dtype=torch.long), ctx)
