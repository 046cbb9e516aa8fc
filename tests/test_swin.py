"""Swin: window attention against a slow loop over the shifted-grid windows, the shifted-window mask, patch
merging, the four-stage encoder and Swin as the image tower of CLIP and BriVL."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import vlkit
from vlkit.errors import VlkitError
from vlkit.models.io import load_model, save_model
from vlkit.modules.encoders.swin import SwinTransformer, swin_config
from vlkit.modules.layers.patch_merging import PatchMerging
from vlkit.modules.layers.window_attention import SwinBlock

pytestmark = pytest.mark.usefixtures("one_thread")


def slow_block(block: SwinBlock, x: torch.Tensor) -> torch.Tensor:
    """A Swin block by a loop over the windows of the (shifted) grid in the map's own coordinates: no roll, no
    padding, no mask. Token (i, j) belongs to window ((i - shift) // w, (j - shift) // w)."""
    b, h, w, c = x.shape
    ws = block.window
    shift = block.shift if (h > ws or w > ws) else 0
    attn = block.attn
    heads, hd = attn.num_heads, attn.head_dim
    y = F.layer_norm(x, (c,), block.norm1.weight, block.norm1.bias, block.norm1.eps)
    q, k, v = (y @ attn.qkv.weight.T + attn.qkv.bias).split(c, dim=-1)
    groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for i in range(h):
        for j in range(w):
            groups.setdefault(((i - shift) // ws, (j - shift) // ws), []).append((i, j))
    out = torch.zeros_like(x)
    table = attn.relative_position_bias_table
    for coords in groups.values():
        ii = torch.tensor([p[0] for p in coords])
        jj = torch.tensor([p[1] for p in coords])
        di = ii[:, None] - ii[None, :] + ws - 1
        dj = jj[:, None] - jj[None, :] + ws - 1
        heads_out = []
        for head in range(heads):
            sl = slice(head * hd, (head + 1) * hd)
            qh, kh, vh = q[:, ii, jj, sl], k[:, ii, jj, sl], v[:, ii, jj, sl]  # [batch, n, hd]
            logits = qh @ kh.transpose(1, 2) / math.sqrt(hd) + table[di * (2 * ws - 1) + dj, head]
            heads_out.append(logits.softmax(dim=-1) @ vh)
        out[:, ii, jj] = torch.cat(heads_out, dim=-1) @ attn.proj.weight.T + attn.proj.bias
    x = x + out
    return x + block.mlp(F.layer_norm(x, (c,), block.norm2.weight, block.norm2.bias, block.norm2.eps))


@pytest.mark.parametrize("size,window,shift", [
    ((8, 8), 4, 0), ((8, 8), 4, 2),  # exact windows, plain and shifted
    ((7, 10), 4, 0), ((7, 10), 4, 2),  # padded on both sides, plain and shifted
    ((9, 5), 3, 1),  # odd window
    ((3, 3), 4, 2),  # smaller than one window: padded, the shift skipped
])
def test_block_equals_slow_window_loop(size, window, shift):
    torch.manual_seed(0)
    block = SwinBlock(16, 2, window, shift=shift).eval()
    with torch.no_grad():
        block.attn.relative_position_bias_table.normal_(0, 1.0)  # a bias large enough to matter
        for norm in (block.norm1, block.norm2):
            norm.weight.normal_(1.0, 0.2)
            norm.bias.normal_(0.0, 0.2)
    x = torch.randn(2, *size, 16)
    with torch.no_grad():
        fast, slow = block(x), slow_block(block, x)
    assert torch.allclose(fast, slow, atol=1e-5), (fast - slow).abs().max()


def influenced(block: SwinBlock, x: torch.Tensor, source: tuple[int, int]) -> set[tuple[int, int]]:
    """Tokens other than ``source`` whose block output changes with the token at ``source`` (the MLP works
    token by token, so only attention carries a token's change to another)."""
    y = x.clone().requires_grad_(True)
    out = block(y)
    changed = {source}
    for i in range(x.shape[1]):
        for j in range(x.shape[2]):
            (g,) = torch.autograd.grad(out[0, i, j].sum(), y, retain_graph=True)
            if g[0, source[0], source[1]].abs().sum() > 0:
                changed.add((i, j))
    return changed


def square(rows, cols) -> set[tuple[int, int]]:
    return {(i, j) for i in rows for j in cols}


def test_shifted_windows_keep_rolled_tokens_apart():
    """8x8 map, window 4, shift 2: the roll brings the corners (0, 0) and (7, 7) into one window, yet each
    attends only within its own window of the shifted grid: rows/columns {0,1}, {2..5}, {6,7}."""
    torch.manual_seed(1)
    block = SwinBlock(8, 2, 4, shift=2).eval()
    x = torch.randn(1, 8, 8, 8)
    assert influenced(block, x, (0, 0)) == square(range(0, 2), range(0, 2))
    assert influenced(block, x, (7, 7)) == square(range(6, 8), range(6, 8))
    assert influenced(block, x, (0, 7)) == square(range(0, 2), range(6, 8))
    assert influenced(block, x, (3, 6)) == square(range(2, 6), range(6, 8))
    assert influenced(block, x, (3, 3)) == square(range(2, 6), range(2, 6))
    plain = SwinBlock(8, 2, 4, shift=0).eval()
    assert influenced(plain, x, (3, 3)) == square(range(0, 4), range(0, 4))


def test_patch_merging_equals_loop():
    torch.manual_seed(2)
    merge = PatchMerging(6).eval()
    x = torch.randn(2, 5, 4, 6)  # odd height: padded with a zero row
    padded = F.pad(x, (0, 0, 0, 0, 0, 1))
    with torch.no_grad():
        out = merge(x)
        ref = torch.zeros(2, 3, 2, 12)
        for i in range(3):
            for j in range(2):
                cell = torch.cat([padded[:, 2 * i, 2 * j], padded[:, 2 * i + 1, 2 * j], padded[:, 2 * i, 2 * j + 1],
                                  padded[:, 2 * i + 1, 2 * j + 1]], dim=-1)
                ref[:, i, j] = merge.reduction(merge.norm(cell))
    assert out.shape == (2, 3, 2, 12) and torch.allclose(out, ref, atol=1e-6)


def test_swin_tiny_has_the_published_sizes():
    model = SwinTransformer(swin_config("swin-tiny")).eval()
    params = sum(p.numel() for p in model.parameters())
    assert params + 768 * 1000 + 1000 == 28_288_354  # Swin-T with its 1000-class head: 28.3M
    assert [len(s.blocks) for s in model.stages] == [2, 2, 6, 2]
    assert [s.blocks[0].attn.num_heads for s in model.stages] == [3, 6, 12, 24]
    assert [s.blocks[1].shift for s in model.stages] == [3, 3, 3, 3]
    with torch.no_grad():
        maps = model.forward_features(torch.randn(1, 3, 224, 224))
    assert [tuple(m.shape[1:]) for m in maps] == [(96, 56, 56), (192, 28, 28), (384, 14, 14), (768, 7, 7)]


def test_other_input_sizes_and_window_clipped_to_the_map():
    torch.manual_seed(3)
    model = SwinTransformer(swin_config("swin-micro")).eval()
    assert [s.blocks[0].window for s in model.stages] == [4, 4, 4, 2]  # the last map is 2x2 at 64 px
    with torch.no_grad():
        maps = model.forward_features(torch.randn(2, 3, 50, 70))  # padded to 52x72, maps padded to windows
        pooled = model(torch.randn(2, 3, 96, 96))
    assert [tuple(m.shape[2:]) for m in maps] == [(13, 18), (7, 9), (4, 5), (2, 3)]
    assert pooled.shape == (2, 256) and torch.isfinite(pooled).all()
    assert all(torch.isfinite(m).all() for m in maps)


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(4)
    model = SwinTransformer(swin_config("swin-micro", depths=(2, 2, 1, 1))).train()
    images = torch.randn(2, 3, 32, 32)
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        model(images).square().sum().backward()
        grads.append(model.stages[0].blocks[1].attn.qkv.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def _train_steps(model, images, ids, mask=None, steps=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    model.train()
    for _ in range(steps):
        out = model(images, ids, mask)
        labels = torch.arange(images.shape[0])
        logits = out.logits_per_image
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_clip_swin_micro_embeds_trains_and_round_trips(tmp_path):
    torch.manual_seed(5)
    model = vlkit.create_model("clip-swin-micro")
    assert isinstance(model.visual, SwinTransformer) and model.preprocess.image_size == 64
    images, ids = torch.randn(4, 3, 64, 64), torch.randint(1, 999, (4, 32))
    before = model.visual.stages[0].blocks[0].attn.relative_position_bias_table.detach().clone()
    losses = _train_steps(model, images, ids, steps=4)
    assert losses[-1] < losses[0]
    assert not torch.equal(before, model.visual.stages[0].blocks[0].attn.relative_position_bias_table)
    model.eval()
    emb = model.encode_image(images)
    assert emb.shape == (4, 32) and torch.allclose(emb.norm(dim=-1), torch.ones(4), atol=1e-5)
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m").eval()
    assert loaded.config == model.config and isinstance(loaded.visual, SwinTransformer)
    assert torch.allclose(loaded.encode_image(images), emb, atol=1e-6)
    from vlkit.models.clip.convert import hf_config_dict

    with pytest.raises(VlkitError, match="Swin"):
        hf_config_dict(model)
    assert len(model.tower_blocks("image")) == 8  # LiT and FSDP see the Swin blocks


@pytest.fixture(scope="module")
def brivl_swin():
    torch.manual_seed(6)
    return vlkit.create_model("brivl-swin-micro")


def test_brivl_swin_micro_pools_the_last_map_and_trains(brivl_swin):
    from vlkit.models.io import load_tokenizer

    model = brivl_swin
    tok = load_tokenizer("/nonexistent", model)
    text = tok(["a red circle", "a blue square", "two shapes"])
    images = torch.rand(3, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        fmap = model.backbone.forward_features(images)[-1]
    regions = model.image_regions(images)
    assert regions.shape == (3, 5, 256)  # scales (1, 2) over the 2x2 last map
    assert torch.allclose(regions[:, 0], fmap.mean(dim=(2, 3)), atol=1e-5)
    assert all(p.requires_grad for p in model.backbone.parameters())  # trained from scratch, whole
    losses = _train_steps(model, images, text["input_ids"], text["attention_mask"], steps=3)
    assert losses[-1] < losses[0]
    assert model.backbone.patch_embed.proj.weight.grad is not None


def test_brivl_swin_partial_training_and_bad_settings():
    model = vlkit.create_model("brivl-swin-micro", trainable_backbone_blocks=2)
    blocks = model.backbone.blocks
    assert all(p.requires_grad for b in blocks[-2:] for p in b.parameters())
    assert not any(p.requires_grad for b in blocks[:-2] for p in b.parameters())
    assert not model.backbone.patch_embed.proj.weight.requires_grad and model.backbone.norm.weight.requires_grad
    with pytest.raises(VlkitError, match="no pretrained weights"):
        vlkit.create_model("brivl-swin-micro", backbone_pretrained=True)


def test_brivl_swin_round_trip(brivl_swin, tmp_path):
    brivl_swin.eval()
    save_model(brivl_swin, tmp_path / "b")
    loaded = load_model(tmp_path / "b").eval()
    assert loaded.config == brivl_swin.config and loaded.config.swin.depths == (2, 2, 2, 2)
    images = torch.rand(2, 3, 64, 64)
    assert torch.allclose(loaded.encode_image(images), brivl_swin.encode_image(images), atol=1e-6)


def test_bench_window_core_grows_linearly_and_global_quadratically():
    """bench/vision_blocks.py at tiny sizes: the attention-core FLOPs equal their closed forms (scores and
    weighted values, 2 x 2 x queries x keys x width), linear in the pixels for windows, quadratic for global."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "vision_blocks.py"
    spec = importlib.util.spec_from_file_location("vision_blocks", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows, result = bench.window_vs_global([32, 64], repeats=1, patch=8, width=16, heads=2, window=2)
    core = {(r["impl"], r["size"]): r["core_gflops"] * 1e9 for r in result["results"]}
    for size in (32, 64):
        tokens = (size // 8) ** 2
        assert core["global", size] == pytest.approx(4 * tokens * tokens * 16)
        assert core["window", size] == pytest.approx(4 * tokens * 4 * 16)  # each query sees its 2x2 window
    assert result["growth"]["window_64"]["core_gflops"] == 4.0 and result["growth"]["global_64"]["core_gflops"] == 16.0
    assert len(rows) == 6



def test_shifted_padded_block_exports_to_onnx(tmp_path):
    """The window partition, roll, padding and mask export with a dynamic batch (``vlkit export --format onnx``
    of a Swin CLIP relies on it): onnxruntime equals PyTorch at another batch size."""
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    from torch.export import Dim

    torch.manual_seed(7)
    block = SwinBlock(16, 2, 4, shift=2).eval()
    path = tmp_path / "block.onnx"
    torch.onnx.export(block, (torch.randn(2, 7, 10, 16),), str(path), dynamo=True, verbose=False,
                      dynamic_shapes={"x": {0: Dim("batch")}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 7, 10, 16)
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        assert (got - block(x)).abs().max() <= 1e-5
