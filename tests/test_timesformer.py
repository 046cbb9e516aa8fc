"""TimeSformer: the space-time attention variants against slow references, initialisation from an image ViT,
shapes, and a short training run where divided attention tells left from right and space-only cannot."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlkit.models.registry import create_model, list_models
from vlkit.models.timesformer import TimeSformer
from vlkit.modules.encoders.vit import VisionTransformer
from vlkit.modules.layers.space_time import SpaceTimeBlock

pytestmark = pytest.mark.usefixtures("one_thread")


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Random values in every parameter (zero-initialised ones and LayerNorms included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = 1.0 if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") else 0.0
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + scale)


def _slow_attention(mha, seq: torch.Tensor) -> torch.Tensor:
    """Self-attention of one sequence ``[tokens, dim]``, query by query, with an explicit softmax."""
    d, h = mha.dim, mha.num_heads
    hd = d // h
    qkv = seq @ mha.in_proj.weight.t() + mha.in_proj.bias
    q, k, v = qkv[:, :d], qkv[:, d:2 * d], qkv[:, 2 * d:]
    out = torch.zeros_like(seq)
    for i in range(seq.shape[0]):
        for head in range(h):
            sl = slice(head * hd, (head + 1) * hd)
            scores = torch.stack([q[i, sl] @ k[j, sl] / math.sqrt(hd) for j in range(seq.shape[0])])
            weights = scores.exp() / scores.exp().sum()
            out[i, sl] = sum(weights[j] * v[j, sl] for j in range(seq.shape[0]))
    return out @ mha.out_proj.weight.t() + mha.out_proj.bias


def _slow_divided(block: SpaceTimeBlock, x: torch.Tensor, frames: int) -> torch.Tensor:
    """The divided block written as loops over clips, patch positions (temporal) and frames (spatial)."""
    b, n_tok, d = x.shape
    n = (n_tok - 1) // frames
    out = x.clone()
    for i in range(b):
        patch = lambda t, p: 1 + t * n + p  # noqa: E731  (token index of patch p in frame t)
        mid = x[i].clone()
        for p in range(n):  # temporal attention at patch position p
            idx = [patch(t, p) for t in range(frames)]
            seq = block.temporal_ln(x[i, idx])
            mid[idx] = x[i, idx] + block.temporal_fc(_slow_attention(block.temporal_attn, seq))
        cls_updates = []
        for t in range(frames):  # spatial attention within frame t, with a copy of the class token
            idx = [patch(t, p) for p in range(n)]
            seq = torch.cat([x[i, :1], mid[idx]])
            res = _slow_attention(block.attn, block.ln_1(seq))
            cls_updates.append(res[0])
            out[i, idx] = mid[idx] + res[1:]
        out[i, 0] = x[i, 0] + torch.stack(cls_updates).mean(0)
        out[i] = out[i] + block.mlp(block.ln_2(out[i]))
    return out


def test_divided_block_equals_loop_over_frames_and_positions():
    torch.manual_seed(0)
    block = SpaceTimeBlock(16, 2, "divided", act="gelu")
    _randomise(block)  # temporal_fc non-zero: the temporal part counts
    frames, patches = 3, 4
    x = torch.randn(2, 1 + frames * patches, 16)
    with torch.no_grad():
        fast, slow = block(x, frames), _slow_divided(block, x, frames)
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)
    # the frame count matters: the same tokens read as 4 frames of 3 patches give another result
    with torch.no_grad():
        assert not torch.allclose(block(x, 4), fast, atol=1e-3)


def test_joint_block_is_full_attention_over_all_tokens():
    torch.manual_seed(1)
    block = SpaceTimeBlock(16, 2, "joint", act="gelu")
    _randomise(block, 1)
    x = torch.randn(2, 1 + 3 * 4, 16)
    with torch.no_grad():
        fast = block(x, 3)
        slow = torch.stack([x[i] + _slow_attention(block.attn, block.ln_1(x[i])) for i in range(2)])
        slow = slow + block.mlp(block.ln_2(slow))
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)


def _tiny(attention: str, **kw) -> TimeSformer:
    return create_model("timesformer-tiny", attention=attention, **kw)


def test_space_only_never_mixes_frames():
    torch.manual_seed(2)
    video = torch.randn(1, 4, 3, 32, 32)
    changed = video.clone()
    changed[:, 3] = torch.randn(3, 32, 32)  # only the last frame differs
    for attention, mixes in (("space", False), ("divided", True), ("joint", True)):
        torch.manual_seed(3)
        model = _tiny(attention).eval()
        _randomise(model, 3)
        with torch.no_grad():
            a, b = model.forward_features(video), model.forward_features(changed)
        if attention == "space":  # [frames, 1 + patches, width]: frames 0..2 untouched, frame 3 changed
            torch.testing.assert_close(a[:3], b[:3])
            assert not torch.allclose(a[3], b[3])
        else:  # the patch tokens of frame 0 see frame 3 through temporal or joint attention
            first = slice(1, 1 + 16)
            assert not torch.allclose(a[:, first], b[:, first], atol=1e-5), attention


@pytest.mark.parametrize("attention", ["divided", "space"])
def test_initialised_from_image_vit_identical_frames_give_image_features(attention):
    torch.manual_seed(4)
    model = _tiny(attention).eval()
    vit = VisionTransformer(model.config.vision()).eval()
    _randomise(vit, 5)
    model.load_image_weights(vit)
    frame = torch.randn(2, 3, 32, 32)
    video = frame[:, None].expand(2, 8, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_video(video), vit(frame), atol=1e-5, rtol=1e-5)
        # the temporal layers are what keeps it equal: a non-zero temporal_fc breaks it
        if attention == "divided":
            model.blocks[0].temporal_fc.weight.normal_()
            assert not torch.allclose(model.encode_video(video), vit(frame), atol=1e-3)


def test_joint_start_differs_from_image_model_and_sizes_must_fit():
    model = _tiny("joint").eval()
    vit = VisionTransformer(model.config.vision()).eval()
    _randomise(vit, 6)
    model.load_image_weights(vit)  # joint attention loads too, but attends over the whole clip
    frame = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(model.encode_video(frame[:, None].expand(1, 8, 3, 32, 32)), vit(frame), atol=1e-4)
    other = VisionTransformer(_tiny("divided", width=32).config.vision())
    with pytest.raises(ValueError, match="width"):
        model.load_image_weights(other)


@pytest.mark.parametrize("attention", ["divided", "joint", "space"])
@pytest.mark.parametrize("frames", [8, 16])
def test_shapes_for_8_and_16_frames(attention, frames):
    model = _tiny(attention, frames=frames, num_classes=5)
    video = torch.randn(2, frames, 3, 32, 32)
    logits = model(video)
    assert logits.shape == (2, 5)
    tokens = model.forward_features(video)
    assert tokens.shape == ((2 * frames, 1 + 16, 64) if attention == "space" else (2, 1 + frames * 16, 64))
    logits.sum().backward()  # every parameter takes part
    unused = [n for n, p in model.named_parameters()
              if p.grad is None and not (attention == "space" and n == "time_embed")]  # space: no time embedding
    assert not unused
    # a model made for 8 frames reads 16 (time embedding interpolated)
    assert _tiny(attention, frames=8)(torch.randn(1, 16, 3, 32, 32)).shape == (1, 8)


def test_registry_names_and_bad_attention():
    assert {"timesformer-tiny", "timesformer-small", "timesformer-base"} <= set(list_models("timesformer*"))
    with pytest.raises(ValueError, match="attention"):
        _tiny("axial")
