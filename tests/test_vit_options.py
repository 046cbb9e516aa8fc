"""The ViT-22B options of the ViT (LayerNorm on queries and keys, parallel attention and MLP, no projection
biases), each against a slow reference written here; the defaults keep every existing model unchanged."""

from __future__ import annotations

import math

import pytest
import torch

import vlkit
from vlkit.errors import VlkitError
from vlkit.modules.encoders.vit import VisionConfig, VisionTransformer
from vlkit.modules.layers.attention import KVCache, MultiHeadAttention
from vlkit.modules.layers.transformer import TransformerEncoderLayer

pytestmark = pytest.mark.usefixtures("one_thread")


def layer_norm(x, norm):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def linear(x, lin):
    y = x @ lin.weight.T
    return y if lin.bias is None else y + lin.bias


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def slow_layer(layer: TransformerEncoderLayer, x, qk_norm: bool, parallel: bool):
    """One encoder layer written out: head by head, token by token softmax."""
    attn = layer.attn
    d, heads, hd = attn.dim, attn.num_heads, attn.head_dim
    h = layer_norm(x, layer.ln_1)
    q, k, v = linear(h, attn.in_proj).split(d, dim=-1)
    outs = []
    for i in range(heads):
        sl = slice(i * hd, (i + 1) * hd)
        qh, kh, vh = q[..., sl], k[..., sl], v[..., sl]
        if qk_norm:
            qh, kh = layer_norm(qh, attn.q_norm), layer_norm(kh, attn.k_norm)
        scores = torch.einsum("bqd,bkd->bqk", qh, kh) / math.sqrt(hd)
        weights = scores.exp() / scores.exp().sum(-1, keepdim=True)
        outs.append(weights @ vh)
    a = linear(torch.cat(outs, dim=-1), attn.out_proj)
    mlp = lambda t: linear(gelu(linear(t, layer.mlp.fc1)), layer.mlp.fc2)  # noqa: E731
    if parallel:
        return x + a + mlp(h)
    x = x + a
    return x + mlp(layer_norm(x, layer.ln_2))


def _randomise_norms(module):
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)


@pytest.mark.parametrize("qk_norm,parallel,bias", [
    (False, False, True), (True, False, True), (False, True, True), (False, False, False), (True, True, False),
])
def test_layer_equals_slow_reference(qk_norm, parallel, bias):
    torch.manual_seed(0)
    layer = TransformerEncoderLayer(24, 3, 2.0, "gelu", qk_norm=qk_norm, parallel=parallel, bias=bias).eval()
    _randomise_norms(layer)
    x = torch.randn(2, 7, 24)
    with torch.no_grad():
        fast, slow = layer(x), slow_layer(layer, x, qk_norm, parallel)
        assert torch.allclose(fast, slow, atol=1e-5)
        # each option changes the result: a reference without it disagrees
        if qk_norm:
            assert not torch.allclose(fast, slow_layer(layer, x, False, parallel), atol=1e-3)
        if parallel:
            layer.ln_2 = layer.ln_1
            assert not torch.allclose(fast, slow_layer(layer, x, qk_norm, False), atol=1e-3)
    projections = [layer.attn.in_proj, layer.attn.out_proj, layer.mlp.fc1, layer.mlp.fc2]
    assert all((p.bias is not None) == bias for p in projections)
    assert hasattr(layer.attn.q_norm, "weight") == qk_norm


def test_defaults_keep_the_state_dict_keys():
    """The existing ViT layer's parameters, unchanged: every saved model and checkpoint loads the same."""
    keys = set(TransformerEncoderLayer(16, 2).state_dict())
    assert keys == {"ln_1.weight", "ln_1.bias", "attn.in_proj.weight", "attn.in_proj.bias", "attn.out_proj.weight",
                    "attn.out_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                    "mlp.fc2.weight", "mlp.fc2.bias"}
    parallel = set(TransformerEncoderLayer(16, 2, qk_norm=True, parallel=True, bias=False).state_dict())
    assert parallel == {"ln_1.weight", "ln_1.bias", "attn.in_proj.weight", "attn.out_proj.weight",
                        "attn.q_norm.weight", "attn.q_norm.bias", "attn.k_norm.weight", "attn.k_norm.bias",
                        "mlp.fc1.weight", "mlp.fc2.weight"}


@pytest.mark.parametrize("options", [dict(qk_norm=True), dict(parallel=True), dict(qk_norm=True, parallel=True,
                                                                                    bias=False)])
def test_vit_class_token_path_equals_full_path(options):
    """The ViT computes its last block for the class token only (``forward_at``): equal to the full blocks."""
    torch.manual_seed(1)
    vit = VisionTransformer(VisionConfig(image_size=32, patch_size=8, width=32, layers=2, heads=2, act="gelu",
                                         **options)).eval()
    _randomise_norms(vit)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(vit(images), vit.pool(vit.forward_features(images)), atol=1e-5)


def test_qk_norm_with_a_kv_cache_equals_the_full_causal_pass():
    torch.manual_seed(2)
    attn = MultiHeadAttention(16, 2, qk_norm=True).eval()
    _randomise_norms(attn)
    x = torch.randn(1, 5, 16)
    with torch.no_grad():
        full = attn(x, is_causal=True)
        cache = KVCache.empty(1, 2, 5, 8)
        steps = [attn(x[:, i : i + 1], is_causal=True, kv_cache=cache) for i in range(5)]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


def test_clip_with_the_options_trains_and_is_not_exported_to_hf(tmp_path):
    from vlkit.models.clip.convert import hf_config_dict
    from vlkit.models.io import load_model, save_model

    torch.manual_seed(3)
    model = vlkit.create_model("clip-tiny", vision_qk_norm=True, vision_parallel=True, vision_bias=False)
    layer = model.visual.blocks[0]
    assert layer.parallel and layer.attn.in_proj.bias is None and not hasattr(layer, "ln_2")
    images, ids = torch.randn(2, 3, 32, 32), torch.randint(1, 999, (2, 32))
    out = model(images, ids)
    out.logits_per_image.logsumexp(1).sum().backward()
    assert layer.attn.q_norm.weight.grad is not None
    save_model(model.eval(), tmp_path / "m")
    loaded = load_model(tmp_path / "m").eval()
    assert loaded.config.vision.qk_norm and loaded.config.vision.parallel and not loaded.config.vision.bias
    assert torch.allclose(loaded.encode_image(images), model.encode_image(images), atol=1e-6)
    with pytest.raises(VlkitError, match="qk_norm, parallel, bias"):
        hf_config_dict(model)
