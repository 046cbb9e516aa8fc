"""Building blocks against independent references: torch's MultiheadAttention, slow loops, closed forms."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlkit.modules.layers.attention import KVCache, MultiHeadAttention
from vlkit.modules.layers.attention_pool import AttentionPool
from vlkit.modules.layers.mlp import MLP, QuickGELU
from vlkit.modules.layers.mspp import MultiScalePatchPooling
from vlkit.modules.layers.patch_dropout import PatchDropout
from vlkit.modules.layers.patch_embed import PatchEmbed
from vlkit.modules.layers.pos_embed import resample_grid, sinusoidal_1d, sinusoidal_2d
from vlkit.modules.layers.transformer import Transformer, TransformerDecoderLayer, TransformerEncoderLayer

torch.manual_seed(0)


def reference_mha(ours: MultiHeadAttention) -> nn.MultiheadAttention:
    """torch's own MultiheadAttention with our weights (an independent implementation)."""
    ref = nn.MultiheadAttention(ours.dim, ours.num_heads, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(ours.in_proj.weight)
        ref.in_proj_bias.copy_(ours.in_proj.bias)
        ref.out_proj.weight.copy_(ours.out_proj.weight)
        ref.out_proj.bias.copy_(ours.out_proj.bias)
    return ref.eval()


def test_self_attention_matches_torch_with_masks():
    attn = MultiHeadAttention(32, 4).eval()
    ref = reference_mha(attn)
    x = torch.randn(3, 7, 32)
    pad = torch.ones(3, 7, dtype=torch.bool)
    pad[1, 5:] = False
    pad[2, 3:] = False
    ours = attn(x, key_padding_mask=pad)
    theirs, _ = ref(x, x, x, key_padding_mask=~pad, need_weights=False)
    assert torch.allclose(ours, theirs, atol=1e-5)
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    ours = attn(x, is_causal=True)
    theirs, _ = ref(x, x, x, attn_mask=~causal, need_weights=False)
    assert torch.allclose(ours, theirs, atol=1e-5)
    both = attn(x, key_padding_mask=pad, is_causal=True)
    theirs, _ = ref(x, x, x, attn_mask=~causal, key_padding_mask=~pad, need_weights=False)
    assert torch.allclose(both, theirs, atol=1e-5)


def test_cross_attention_matches_a_slow_loop():
    attn = MultiHeadAttention(16, 2, kv_dim=8).eval()
    x, ctx = torch.randn(2, 3, 16), torch.randn(2, 5, 8)
    out = attn(x, ctx)
    q = attn.q_proj(x)
    k, v = attn.kv_proj(ctx).chunk(2, dim=-1)
    expected = torch.zeros(2, 3, 16)
    for b in range(2):
        for h in range(2):
            sl = slice(h * 8, (h + 1) * 8)
            w = torch.softmax(q[b, :, sl] @ k[b, :, sl].T / math.sqrt(8), dim=-1)
            expected[b, :, sl] = w @ v[b, :, sl]
    assert torch.allclose(out, attn.out_proj(expected), atol=1e-5)


def test_kv_cache_decoding_equals_full_causal_pass():
    layer = TransformerEncoderLayer(32, 4, act="gelu").eval()
    x = torch.randn(2, 9, 32)
    full = layer(x, is_causal=True)
    cache = KVCache.empty(2, 4, 16, 8)
    prefix = layer(x[:, :4], is_causal=True, kv_cache=cache)  # a prompt of 4 tokens at once
    steps = [layer(x[:, i : i + 1], is_causal=True, kv_cache=cache) for i in range(4, 9)]  # then one by one
    assert torch.allclose(torch.cat([prefix, *steps], dim=1), full, atol=1e-5)
    assert cache.length == 9
    with pytest.raises(ValueError, match="overflow"):
        layer(torch.randn(2, 8, 32), is_causal=True, kv_cache=cache)


def test_decoder_layer_is_causal_and_uses_the_context():
    layer = TransformerDecoderLayer(16, 2, context_dim=8).eval()
    x, ctx = torch.randn(1, 6, 16), torch.randn(1, 4, 8)
    out = layer(x, ctx)
    x2 = x.clone()
    x2[:, 4:] += 1.0  # changing later tokens leaves earlier outputs unchanged
    assert torch.allclose(layer(x2, ctx)[:, :4], out[:, :4], atol=1e-6)
    assert not torch.allclose(layer(x, ctx + 1.0), out)


def test_transformer_checkpointing_gives_same_gradients():
    stack = Transformer([TransformerEncoderLayer(16, 2) for _ in range(3)]).train()
    x = torch.randn(2, 5, 16, requires_grad=True)
    stack(x).square().sum().backward()
    plain = [p.grad.clone() for p in stack.parameters()]
    stack.zero_grad()
    stack.grad_checkpointing = True
    stack(x).square().sum().backward()
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(plain, stack.parameters()))


def test_mlp_and_quick_gelu():
    x = torch.randn(4, 8)
    assert torch.allclose(QuickGELU()(x), x * torch.sigmoid(1.702 * x))
    mlp = MLP(8, 32, act="gelu")
    assert torch.allclose(mlp(x), mlp.fc2(F.gelu(mlp.fc1(x))))
    with pytest.raises(ValueError, match="unknown activation"):
        MLP(8, 16, act="nope")


def test_patch_embed_matches_unfold():
    pe = PatchEmbed(4, 10, bias=True)
    img = torch.randn(2, 3, 8, 12)
    out = pe(img)
    patches = F.unfold(img, kernel_size=4, stride=4).transpose(1, 2)  # [2, 6, 48]
    expected = patches @ pe.proj.weight.reshape(10, -1).T + pe.proj.bias
    assert out.shape == (2, 6, 10) and torch.allclose(out, expected, atol=1e-5)


def test_sinusoidal_closed_form_and_grid_resampling():
    emb = sinusoidal_1d(5, 8)
    assert torch.allclose(emb[3, 2], torch.tensor(math.sin(3 / 10000 ** (2 / 8))), atol=1e-6)
    assert torch.allclose(emb[3, 3], torch.tensor(math.cos(3 / 10000 ** (2 / 8))), atol=1e-6)
    grid = sinusoidal_2d(3, 4, 8)
    assert grid.shape == (12, 8) and torch.equal(grid[5, :4], sinusoidal_1d(3, 4)[1])
    pos = torch.randn(1 + 16, 6)
    same = resample_grid(pos, (4, 4), (4, 4))
    assert same is pos
    up = resample_grid(pos, (4, 4), (8, 8))
    assert up.shape == (65, 6) and torch.equal(up[0], pos[0])
    const = torch.cat([torch.zeros(1, 2), torch.ones(16, 2) * 3.0])
    assert torch.allclose(resample_grid(const, (4, 4), (6, 6))[1:], torch.full((36, 2), 3.0), atol=1e-5)


def test_patch_dropout_keeps_prefix_and_a_subset():
    pd = PatchDropout(0.5).train()
    x = torch.arange(2 * 9, dtype=torch.float).reshape(2, 9, 1)
    out = pd(x)
    assert out.shape == (2, 5, 1) and torch.equal(out[:, 0], x[:, 0])
    for b in range(2):
        kept = set(out[b, 1:, 0].tolist())
        assert len(kept) == 4 and kept <= set(x[b, 1:, 0].tolist())
    assert torch.equal(pd.eval()(x), x)


def test_mspp_37_regions_match_a_slow_loop():
    mspp = MultiScalePatchPooling((1, 6))
    fmap = torch.randn(2, 5, 12, 12)
    out = mspp(fmap)
    assert mspp.num_regions == 37 and out.shape == (2, 37, 5)
    assert torch.allclose(out[:, 0], fmap.mean(dim=(2, 3)), atol=1e-6)
    for r in range(6):
        for c in range(6):
            region = fmap[:, :, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2].mean(dim=(2, 3))
            assert torch.allclose(out[:, 1 + 6 * r + c], region, atol=1e-6)
    small = mspp(torch.randn(1, 5, 7, 7))  # EfficientNet at 224 px: a 7x7 map still gives 37 regions
    assert small.shape == (1, 37, 5)
    assert MultiScalePatchPooling((1, 2, 4), mode="max")(fmap).shape == (2, 21, 5)


def test_attention_pool_shapes_and_padding():
    pool = AttentionPool(16, 2, num_queries=3, context_dim=8).eval()
    tokens = torch.randn(2, 6, 8)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[:, 4:] = False
    out = pool(tokens, key_padding_mask=mask)
    assert out.shape == (2, 3, 16)
    changed = tokens.clone()
    changed[:, 4:] = 100.0  # masked tokens cannot change the result
    assert torch.allclose(pool(changed, key_padding_mask=mask), out, atol=1e-5)


def test_forward_at_equals_the_full_layer_at_those_positions():
    layer = TransformerEncoderLayer(32, 4).eval()
    x = torch.randn(3, 8, 32)
    index = torch.tensor([0, 5, 7])
    pad = torch.ones(3, 8, dtype=torch.bool)
    pad[0, 6:] = False
    for causal in (False, True):
        full = layer(x, key_padding_mask=pad, is_causal=causal)[torch.arange(3), index]
        assert torch.allclose(layer.forward_at(x, index, pad, causal)[:, 0], full, atol=1e-5)
    stack = Transformer([TransformerEncoderLayer(32, 4) for _ in range(3)]).eval()
    full = stack(x, is_causal=True)[torch.arange(3), index]
    assert torch.allclose(stack(x, is_causal=True, output_index=index)[:, 0], full, atol=1e-5)
