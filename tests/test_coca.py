"""CoCa: open_clip checkpoints load one tensor to one tensor (checked against a reference forward built from the
raw open_clip tensors with torch.nn.MultiheadAttention), cached decoding, heads, padding, save/load, overfitting."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlkit.errors import VlkitError
from vlkit.models.coca.builders import coca
from vlkit.models.coca.convert import convert_open_clip_coca
from vlkit.models.io import load_model, save_model
from vlkit.models.outputs import TwoTowerOutput
from vlkit.models.registry import create_model

# a small open_clip-layout CoCa: pooled width 32 < ViT width 48, so the pooler stores separate q/k/v weights
SMALL = dict(image_size=32, patch_size=8, embed_dim=32, vision_width=48, vision_layers=2, vision_heads=2,
             text_width=32, text_layers=2, text_heads=4, decoder_width=32, decoder_layers=2, decoder_heads=4,
             num_queries=6, pooler_heads=2, vocab_size=50, context_length=10, bos_token_id=48, eos_token_id=49,
             pad_token_id=0)


# ---------------------------------------------------------------------------------------------- open_clip layout
def _ln(s, name, d):
    s[f"{name}.weight"] = 1 + 0.1 * torch.randn(d)
    s[f"{name}.bias"] = 0.1 * torch.randn(d)


def _linear(s, name, out, inp):
    s[f"{name}.weight"] = torch.randn(out, inp) * inp**-0.5
    s[f"{name}.bias"] = 0.1 * torch.randn(out)


def _resblock(s, pre, d, cross=False):
    _ln(s, pre + "ln_1", d)
    s[pre + "attn.in_proj_weight"] = torch.randn(3 * d, d) * d**-0.5
    s[pre + "attn.in_proj_bias"] = 0.1 * torch.randn(3 * d)
    _linear(s, pre + "attn.out_proj", d, d)
    if cross:
        _ln(s, pre + "ln_1_kv", d)
    _ln(s, pre + "ln_2", d)
    _linear(s, pre + "mlp.c_fc", 4 * d, d)
    _linear(s, pre + "mlp.c_proj", d, 4 * d)


def _pooler(s, pre, d, context, queries):
    s[pre + "query"] = torch.randn(queries, d)
    _ln(s, pre + "ln_q", d)
    _ln(s, pre + "ln_k", context)
    if d == context:
        s[pre + "attn.in_proj_weight"] = torch.randn(3 * d, d) * d**-0.5
    else:
        s[pre + "attn.q_proj_weight"] = torch.randn(d, d) * d**-0.5
        s[pre + "attn.k_proj_weight"] = torch.randn(d, context) * context**-0.5
        s[pre + "attn.v_proj_weight"] = torch.randn(d, context) * context**-0.5
    s[pre + "attn.in_proj_bias"] = 0.1 * torch.randn(3 * d)
    _linear(s, pre + "attn.out_proj", d, d)


def open_clip_state(c: dict, separate: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the key names and shapes of open_clip's CoCa (VisionTransformer with
    attentional_pool, TextTransformer with embed_cls, MultimodalTransformer)."""
    torch.manual_seed(seed)
    s: dict[str, torch.Tensor] = {}
    w, e, t, d, v = c["vision_width"], c["embed_dim"], c["text_width"], c["decoder_width"], c["vocab_size"]
    p, grid = c["patch_size"], (c["image_size"] // c["patch_size"]) ** 2
    s["visual.conv1.weight"] = torch.randn(w, 3, p, p) * 0.05
    s["visual.class_embedding"] = torch.randn(w) * w**-0.5
    s["visual.positional_embedding"] = torch.randn(grid + 1, w) * w**-0.5
    _ln(s, "visual.ln_pre", w)
    for i in range(c["vision_layers"]):
        _resblock(s, f"visual.transformer.resblocks.{i}.", w)
    _pooler(s, "visual.attn_pool.", e, w, c["num_queries"])
    if separate:
        _pooler(s, "visual.attn_pool_contrastive.", e, w, 1)
    _ln(s, "visual.ln_post", w if separate else e)
    s["visual.proj"] = torch.randn(e, e) * e**-0.5
    s["text.token_embedding.weight"] = torch.randn(v, t) * 0.1
    s["text.positional_embedding"] = torch.randn(c["context_length"] + 1, t) * 0.1
    s["text.cls_emb"] = torch.randn(t) * 0.1
    for i in range(c["text_layers"]):
        _resblock(s, f"text.transformer.resblocks.{i}.", t)
    _ln(s, "text.ln_final", t)
    s["text.text_projection"] = torch.randn(t, e) * t**-0.5
    for i in range(c["decoder_layers"]):
        _resblock(s, f"text_decoder.resblocks.{i}.", d)
        _resblock(s, f"text_decoder.cross_attn.{i}.", d, cross=True)
    _ln(s, "text_decoder.ln_final", d)
    s["text_decoder.text_projection"] = torch.randn(d, v) * d**-0.5
    s["logit_scale"] = torch.tensor(math.log(1 / 0.07))
    return s


# ---------------------------------------------------------------------------------------------- reference forward
def _layer_norm(s, name, x):
    return F.layer_norm(x, x.shape[-1:], s[f"{name}.weight"], s[f"{name}.bias"])


def _mha(s, pre, heads, d, kdim=None):
    """torch's own nn.MultiheadAttention holding an open_clip attention's raw tensors."""
    mha = nn.MultiheadAttention(d, heads, batch_first=True, kdim=kdim, vdim=kdim)
    own = {k: s[pre + k] for k in mha.state_dict()}
    mha.load_state_dict(own)
    return mha.eval()


def _ref_block(s, pre, heads, x, mask=None, context=None):
    d = x.shape[-1]
    h = _layer_norm(s, pre + "ln_1", x)
    kv = h if context is None else _layer_norm(s, pre + "ln_1_kv", context)
    x = x + _mha(s, pre + "attn.", heads, d)(h, kv, kv, attn_mask=mask, need_weights=False)[0]
    h = _layer_norm(s, pre + "ln_2", x)
    h = F.linear(F.gelu(F.linear(h, s[pre + "mlp.c_fc.weight"], s[pre + "mlp.c_fc.bias"])),
                 s[pre + "mlp.c_proj.weight"], s[pre + "mlp.c_proj.bias"])
    return x + h


def _ref_pool(s, pre, heads, x):
    q = _layer_norm(s, pre + "ln_q", s[pre + "query"])
    kv = _layer_norm(s, pre + "ln_k", x)
    d = q.shape[-1]
    mha = _mha(s, pre + "attn.", heads, d, kdim=None if d == x.shape[-1] else x.shape[-1])
    return mha(q[None].expand(x.shape[0], -1, -1), kv, kv, need_weights=False)[0]


def reference_coca(s, c, images, ids, legacy, separate=False):
    """open_clip's CoCa forward from the raw tensors: (image latent, text latent, logits), unnormalised;
    ``ids`` padded to the full context as open_clip's tokenizer pads."""
    p, b = c["patch_size"], images.shape[0]
    x = F.conv2d(images, s["visual.conv1.weight"], stride=p).flatten(2).transpose(1, 2)
    x = torch.cat([s["visual.class_embedding"].expand(b, 1, -1), x], 1) + s["visual.positional_embedding"]
    x = _layer_norm(s, "visual.ln_pre", x)
    for i in range(c["vision_layers"]):
        x = _ref_block(s, f"visual.transformer.resblocks.{i}.", c["vision_heads"], x)
    if separate:  # open_clip's "parallel" pooling
        x = _layer_norm(s, "visual.ln_post", x)
        context = _ref_pool(s, "visual.attn_pool.", c["pooler_heads"], x)
        pooled = _ref_pool(s, "visual.attn_pool_contrastive.", c["pooler_heads"], x)[:, 0]
    else:  # open_clip's default: the first query is the contrastive one
        x = _layer_norm(s, "visual.ln_post", _ref_pool(s, "visual.attn_pool.", c["pooler_heads"], x))
        pooled, context = x[:, 0], x[:, 1:]
    image_latent = pooled @ s["visual.proj"]

    length = ids.shape[1]
    t = s["text.token_embedding.weight"][ids]
    t = torch.cat([t, s["text.cls_emb"].expand(b, 1, -1)], 1) + s["text.positional_embedding"][: length + 1]
    causal = torch.full((length + 1, length + 1), float("-inf")).triu(1)
    valid = ids != c["pad_token_id"]
    ones = torch.ones(b, 1, dtype=torch.bool)
    valid = torch.cat([ones, valid] if legacy else [valid, ones], 1)  # [b, L + 1] over keys
    pad = torch.zeros(b, length + 1, length + 1).masked_fill(~valid[:, None, :], float("-inf"))
    mask = (causal[None] + pad).repeat_interleave(c["text_heads"], 0)
    for i in range(c["text_layers"]):
        t = _ref_block(s, f"text.transformer.resblocks.{i}.", c["text_heads"], t, mask=mask)
    text_latent = _layer_norm(s, "text.ln_final", t[:, -1]) @ s["text.text_projection"]
    tokens = t[:, :-1]
    dec_mask = torch.full((length, length), float("-inf")).triu(1)
    for i in range(c["decoder_layers"]):
        tokens = _ref_block(s, f"text_decoder.resblocks.{i}.", c["decoder_heads"], tokens, mask=dec_mask)
        tokens = _ref_block(s, f"text_decoder.cross_attn.{i}.", c["decoder_heads"], tokens, context=context)
    logits = _layer_norm(s, "text_decoder.ln_final", tokens) @ s["text_decoder.text_projection"]
    return image_latent, text_latent, logits


def _texts(c, lengths, total):
    """[bos] words [eos] then padding to ``total``."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for n in lengths:
        words = torch.randint(1, c["vocab_size"] - 2, (n,), generator=g).tolist()
        row = [c["bos_token_id"], *words, c["eos_token_id"]]
        rows.append(row + [c["pad_token_id"]] * (total - len(row)))
    return torch.tensor(rows)


@pytest.mark.parametrize("legacy, separate, fused_pool", [(False, False, False), (True, False, False),
                                                          (True, False, True), (False, True, True)])
def test_open_clip_weights_reproduce_reference_forward(tmp_path, legacy, separate, fused_pool):
    c = dict(SMALL)
    if fused_pool:  # equal widths: open_clip stores the pooler's q/k/v fused (in_proj_weight)
        c["vision_width"] = c["embed_dim"]
    state = open_clip_state(c, separate=separate)
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "coca.pt")
    model = coca(**c, legacy_cls_mask=legacy, contrastive_pooler="separate" if separate else "first").eval()
    model.load_pretrained(tmp_path / "coca.pt")

    assert torch.equal(model.visual_projection.weight, state["visual.proj"].t())
    assert torch.equal(model.decoder.lm_head.weight, state["text_decoder.text_projection"].t())
    torch.manual_seed(3)
    images = torch.randn(4, 3, 32, 32)
    full = _texts(c, [3, 6, 5, 8], c["context_length"])  # open_clip pads every text to the full context
    with torch.no_grad():
        ref_image, ref_text, ref_logits = reference_coca(state, c, images, full, legacy, separate)
        out = model(images, full, head="coca")
        # vlkit pads a batch to its longest text only (here each text alone, unpadded)
        alone = torch.cat([model.encode_text(row[None, : int((row != 0).sum())]) for row in full])
    torch.testing.assert_close(out.image_embeds, F.normalize(ref_image, dim=-1), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.text_embeds, F.normalize(ref_text, dim=-1), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(alone, F.normalize(ref_text, dim=-1), atol=1e-5, rtol=1e-4)
    real = full != 0
    torch.testing.assert_close(out.logits[real], ref_logits[real], atol=1e-4, rtol=1e-4)
    assert float(out.logit_scale) == pytest.approx(1 / 0.07, rel=1e-5)


def test_cross_attention_block_matches_slow_loop():
    """One open_clip-layout cross-attention block computed by hand, head by head, from the raw tensors."""
    c = dict(SMALL)
    state = open_clip_state(c)
    model = coca(**c).eval()
    model.load_state_dict(convert_open_clip_coca(state, model))
    pre, d, heads = "text_decoder.cross_attn.1.", c["decoder_width"], c["decoder_heads"]
    torch.manual_seed(4)
    x, context = torch.randn(2, 5, d), torch.randn(2, 7, d)
    hd = d // heads
    w, bias = state[pre + "attn.in_proj_weight"], state[pre + "attn.in_proj_bias"]
    ln = lambda name, t: F.layer_norm(t, (d,), state[pre + name + ".weight"], state[pre + name + ".bias"])  # noqa: E731
    q_in, kv_in = ln("ln_1", x), ln("ln_1_kv", context)
    expected = torch.zeros_like(x)
    for b in range(2):
        heads_out = []
        for h in range(heads):
            rows = slice(h * hd, (h + 1) * hd)
            q = q_in[b] @ w[:d][rows].t() + bias[:d][rows]
            k = kv_in[b] @ w[d:2 * d][rows].t() + bias[d:2 * d][rows]
            v = kv_in[b] @ w[2 * d:][rows].t() + bias[2 * d:][rows]
            att = torch.softmax(q @ k.t() / math.sqrt(hd), dim=-1)
            heads_out.append(att @ v)
        attn = torch.cat(heads_out, -1) @ state[pre + "attn.out_proj.weight"].t() + state[pre + "attn.out_proj.bias"]
        y = x[b] + attn
        h = ln("ln_2", y) @ state[pre + "mlp.c_fc.weight"].t() + state[pre + "mlp.c_fc.bias"]
        expected[b] = y + F.gelu(h) @ state[pre + "mlp.c_proj.weight"].t() + state[pre + "mlp.c_proj.bias"]
    with torch.no_grad():
        got = model.decoder.cross_layers[1](x, context)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_unknown_missing_and_misshaped_keys_are_named(tmp_path):
    c = dict(SMALL)
    model = coca(**c)
    state = open_clip_state(c)
    extra = {**state, "text_decoder.cross_attn.0.ls_1.gamma": torch.ones(32)}
    with pytest.raises(VlkitError, match=r"unknown key.*text_decoder\.cross_attn\.0\.ls_1\.gamma"):
        convert_open_clip_coca(extra, model)
    lacking = {k: v for k, v in state.items() if k != "text_decoder.cross_attn.1.ln_1_kv.weight"}
    torch.save(lacking, tmp_path / "lacking.pt")
    with pytest.raises(VlkitError, match=r"missing key.*text_decoder\.cross_attn\.1\.ln_1_kv\.weight"):
        model.load_pretrained(tmp_path / "lacking.pt")
    wrong = {**state, "text.cls_emb": torch.zeros(33)}
    with pytest.raises(VlkitError, match=r"shape mismatch.*text\.cls_emb"):
        convert_open_clip_coca(wrong, model)
    with_contrastive = open_clip_state({**c, "vision_width": 32}, separate=True)
    with pytest.raises(VlkitError, match="contrastive_pooler='separate'"):
        convert_open_clip_coca(with_contrastive, coca(**{**c, "vision_width": 32}))
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(VlkitError, match="not a CoCa checkpoint"):
        model.load_pretrained(tmp_path / "other.pt")


# ---------------------------------------------------------------------------------------------- behaviour
@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_model("coca-tiny").eval()


def _batch(model, lengths=(4, 9, 6), total=None):
    c = model.config
    spec = dict(vocab_size=c.vocab_size, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
                pad_token_id=c.pad_token_id)
    ids = _texts(spec, lengths, total or max(lengths) + 2)
    torch.manual_seed(5)
    return torch.randn(len(lengths), 3, c.image_size, c.image_size), ids, (ids != c.pad_token_id).long()


def test_cached_decoding_equals_teacher_forcing(tiny):
    images, ids, mask = _batch(tiny)
    with torch.no_grad():
        full = tiny.caption_logits(images, ids, mask)  # [batch, length, vocab]
        cache = tiny.start_decoding(images, max_length=ids.shape[1])
        steps = [tiny.decode_step(ids[:, :3], cache)]  # a prompt of three tokens at once, then one at a time
        steps += [tiny.decode_step(ids[:, t : t + 1], cache) for t in range(3, ids.shape[1])]
    assert len(cache.cross_kv) == tiny.config.decoder_layers
    assert cache.length == ids.shape[1]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    spec = tiny.generation
    assert (spec.bos_token_id, spec.eos_token_id, spec.pad_token_id, spec.max_length) == (2, 3, 0, 32)


@pytest.mark.parametrize("legacy", [False, True])
def test_contrastive_latent_ignores_padding_length(tiny, legacy):
    model = tiny if not legacy else create_model("coca-tiny", legacy_cls_mask=True).eval()
    _, ids, mask = _batch(model, total=12)
    longest = int(mask.sum(1).max())
    with torch.no_grad():
        reference = model.encode_text(ids, mask)
        for total in (longest, 20, model.config.context_length):
            padded = F.pad(ids[:, :longest], (0, total - longest))
            torch.testing.assert_close(model.encode_text(padded), reference, atol=1e-5, rtol=1e-5)
        alone = torch.cat([model.encode_text(ids[i : i + 1, : int(mask[i].sum())]) for i in range(3)])
    torch.testing.assert_close(alone, reference, atol=1e-5, rtol=1e-5)


def test_coca_head_equals_separate_heads(tiny):
    images, ids, mask = _batch(tiny)
    with torch.no_grad():
        both = tiny(images, ids, mask, head="coca")
        two = tiny(images, ids, mask)
        logits = tiny(images, ids, mask, head="caption")
    assert isinstance(two, TwoTowerOutput)
    torch.testing.assert_close(both.image_embeds, two.image_embeds, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(both.text_embeds, two.text_embeds, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(both.logits, logits, atol=1e-5, rtol=1e-5)
    assert both.logits.shape == (3, ids.shape[1], 1000)
    assert torch.equal(both.logit_scale, two.logit_scale)
    with pytest.raises(VlkitError, match="unknown CoCa head"):
        tiny(images, ids, head="itm")


def test_separate_pooler_shapes_and_context():
    model = create_model("coca-tiny", contrastive_pooler="separate", num_queries=5).eval()
    images, ids, mask = _batch(model)
    latent, context = model.image_features(images)
    assert latent.shape == (3, 64) and context.shape == (3, 5, 64)
    first = create_model("coca-tiny", num_queries=5)
    assert first.image_features(images)[1].shape == (3, 4, 64)  # the first query is the contrastive one
    with pytest.raises(VlkitError, match="contrastive_pooler"):
        create_model("coca-tiny", contrastive_pooler="mean")


def test_save_load_round_trip(tmp_path, tiny):
    images, ids, mask = _batch(tiny)
    save_model(tiny, tmp_path / "m")
    loaded = load_model(tmp_path / "m").eval()
    assert type(loaded).__name__ == "CoCa" and loaded.config == tiny.config
    with torch.no_grad():
        a, b = tiny(images, ids, mask, head="coca"), loaded(images, ids, mask, head="coca")
    for name in ("image_embeds", "text_embeds", "logits"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    fresh = create_model("coca-tiny", pretrained=tmp_path / "m").eval()  # a vlkit directory through the registry
    with torch.no_grad():
        assert torch.equal(fresh(images, ids, mask, head="caption"), tiny(images, ids, mask, head="caption"))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, str(tmp_path / "w.safetensors"))
    other = create_model("coca-tiny")
    other.load_pretrained(tmp_path / "w.safetensors")  # a bare vlkit weights file
    assert torch.equal(other.decoder.lm_head.weight, tiny.decoder.lm_head.weight)


def test_towers_and_lr_groups_cover_the_model(tiny):
    towers = tiny.towers()
    names = {n for n, _ in tiny.named_parameters()}
    image = {n for n in names if n.startswith(tiny.LR_GROUPS["image"])}
    assert {id(p) for p in towers["image"].parameters()} == {id(p) for n, p in tiny.named_parameters() if n in image
                                                            or n.startswith("visual_projection.")}
    assert len(tiny.tower_blocks("text")) == 2 and len(tiny.tower_blocks("image")) == 2


# ---------------------------------------------------------------------------------------------- overfitting
CAPTIONS = ["a red square on the left", "a blue circle at the top", "two green lines crossing",
            "a yellow star in the corner", "a small black dot", "three white stripes",
            "an orange triangle pointing down", "a purple ring around nothing"]


def _greedy(model, images, max_length):
    """Greedy decoding by hand through start_decoding / decode_step."""
    spec = model.generation
    cache = model.start_decoding(images, max_length)
    out = torch.full((images.shape[0], 1), spec.bos_token_id)
    token = out
    done = torch.zeros(images.shape[0], dtype=torch.bool)
    for _ in range(max_length - 1):
        token = model.decode_step(token, cache)[:, -1].argmax(-1, keepdim=True)
        token = torch.where(done[:, None], torch.full_like(token, spec.pad_token_id), token)
        out = torch.cat([out, token], dim=1)
        done |= token[:, 0] == spec.eos_token_id
        if done.all():
            break
    return out


def test_coca_tiny_overfits_a_fixed_batch():
    from vlkit.data.text import build_word_tokenizer
    from vlkit.modules.losses.captioning import caption_labels, caption_loss
    from vlkit.modules.losses.contrastive import contrastive_loss

    torch.manual_seed(0)
    tokenizer = build_word_tokenizer(CAPTIONS)
    tokens = tokenizer(CAPTIONS)
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    model = create_model("coca-tiny")
    images = torch.randn(8, 3, 32, 32)
    labels = caption_labels(ids, mask)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    c = model.config
    losses = []
    for _ in range(60):
        out = model(images, ids, mask, head="coca")
        cap = caption_loss(out.logits, labels)
        loss = c.caption_loss_weight * cap.loss + c.contrastive_loss_weight * contrastive_loss(
            out.image_embeds, out.text_embeds, out.logit_scale).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(cap.loss.detach()))
    model.eval()
    assert losses[-1] < 0.05 * losses[0], (losses[0], losses[-1])
    with torch.no_grad():
        written = _greedy(model, images[:3], max_length=16)
        retrieval = model(images, ids, mask).logits_per_image.argmax(-1)
    assert tokenizer.decode_batch(written.tolist()) == CAPTIONS[:3]
    try:  # the shared generate(), where present: beam search reorders and repeats CoCa's cache
        from vlkit.inference.generate import generate
    except ImportError:
        generate = None
    if generate is not None:
        beams = generate(model, images[:3], max_new_tokens=15, num_beams=3).texts(tokenizer)
        assert [b[0] for b in beams] == CAPTIONS[:3]
    assert torch.equal(retrieval, torch.arange(8))
