"""BLIP: the three text modes checked against a reference forward built with torch.nn.MultiheadAttention, what each
mode may and may not see, which tensors the modes share, cached decoding against teacher forcing, overfitting a
batch (the decoder then writes its captions), save/load, ITM negatives under group ids, and a recipe run through
the itm and captioning tasks followed by `vlkit caption` and `vlkit eval`."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlkit.data.text import build_word_tokenizer
from vlkit.errors import VlkitError
from vlkit.inference.generate import generate
from vlkit.models.blip.builders import blip
from vlkit.models.io import load_model, save_model
from vlkit.models.outputs import TwoTowerOutput
from vlkit.models.registry import create_model, list_models

pytestmark = pytest.mark.usefixtures("one_thread")

CAPTIONS = ["a red circle on the left", "a blue square at the top", "a green triangle in the middle",
            "a yellow circle at the bottom", "a red square on the right", "a blue triangle on the left",
            "a green circle at the top", "a yellow square in the middle"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer(CAPTIONS, max_length=32)


@pytest.fixture(scope="module")
def batch(tokenizer):
    """8 images (a coloured block at a caption-specific place) and their captions ``[CLS] ... [SEP]``."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(8, 3, 32, 32, generator=g) * 0.1
    for i in range(8):
        r, c = divmod(i, 4)
        images[i, i % 3, 16 * r: 16 * r + 16, 8 * c: 8 * c + 8] += 2.0
    text = tokenizer(CAPTIONS)
    return images, text["input_ids"], text["attention_mask"]


def _tiny(tokenizer, **overrides) -> nn.Module:
    torch.manual_seed(0)
    return create_model("blip-tiny", vocab_size=tokenizer.vocab_size, **overrides)


@pytest.fixture(scope="module")
def fresh(tokenizer):
    return _tiny(tokenizer).eval()


# ---------------------------------------------------------------------------------------------- reference forward
def _mha(attn, heads: int, kdim: int | None = None) -> nn.MultiheadAttention:
    """torch's own attention holding the weights of a vlkit MultiHeadAttention."""
    d = attn.dim
    ref = nn.MultiheadAttention(d, heads, batch_first=True, kdim=kdim, vdim=kdim)
    with torch.no_grad():
        if attn.cross:
            k_w, v_w = attn.kv_proj.weight.chunk(2)
            ref.q_proj_weight.copy_(attn.q_proj.weight)
            ref.k_proj_weight.copy_(k_w)
            ref.v_proj_weight.copy_(v_w)
            ref.in_proj_bias.copy_(torch.cat([attn.q_proj.bias, attn.kv_proj.bias]))
        else:
            ref.in_proj_weight.copy_(attn.in_proj.weight)
            ref.in_proj_bias.copy_(attn.in_proj.bias)
        ref.out_proj.load_state_dict(attn.out_proj.state_dict())
    return ref.eval()


def reference_text(model, ids, mask, mode, context=None):
    """The text transformer in ``mode`` from its raw tensors: pre-norm layers with torch's attention; the image-
    grounded modes read the mode's marker at position 0, the decoder its own causal self-attention."""
    t, c = model.text, model.config
    ln = lambda norm, x: F.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, norm.eps)  # noqa: E731
    x = t.embed.word_embed.weight[ids].clone()
    if mode != "text":
        x[:, 0] = t.markers[mode]
    length = ids.shape[1]
    x = x + t.embed.pos_embed[:length]
    causal = torch.ones(length, length, dtype=torch.bool).triu(1)  # True: not attended
    for layer in t.layers:
        if mode == "decoder":
            h = ln(layer.ln_causal, x)
            x = x + _mha(layer.causal_attn, c.text_heads)(h, h, h, attn_mask=causal, need_weights=False)[0]
        else:
            h = ln(layer.ln_1, x)
            x = x + _mha(layer.self_attn, c.text_heads)(h, h, h, key_padding_mask=mask == 0, need_weights=False)[0]
        if mode != "text":
            h = ln(layer.ln_cross, x)
            cross = _mha(layer.cross_attn, c.text_heads, kdim=c.vision_width)
            x = x + cross(h, context, context, need_weights=False)[0]
        h = ln(layer.ln_2, x)
        x = x + layer.mlp.fc2(F.gelu(layer.mlp.fc1(h)))
    return ln(t.norm, x)


def test_modes_match_a_reference_forward(tokenizer, batch):
    """Text width 32 against image tokens of width 48 (so the cross-attention maps widths), padded texts."""
    model = blip(image_size=32, patch_size=8, vision_width=48, vision_layers=1, vision_heads=2, text_width=32,
                 text_layers=2, text_heads=4, vocab_size=tokenizer.vocab_size, bos_token_id=2, eos_token_id=3,
                 context_length=16, embed_dim=16, queue_size=16).eval()
    images, ids, mask = batch
    with torch.no_grad():
        context = model.image_tokens(images)  # [8, 17, 48]
        real = mask.bool()
        for mode in ("text", "encoder", "decoder"):
            got = model.text(ids, mask, mode, None if mode == "text" else context)
            want = reference_text(model, ids, mask, mode, context)
            torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5, msg=mode)
        # the heads read the right mode and token
        lm = model.lm_head
        hidden = reference_text(model, ids, mask, "decoder", context)
        logits = lm.norm(F.gelu(lm.dense(hidden))) @ model.text.word_embeddings.weight.T + lm.decoder_bias
        torch.testing.assert_close(model.caption_logits(images, ids, mask), logits, atol=1e-4, rtol=1e-4)
        enc = reference_text(model, ids, mask, "encoder", context)[:, 0]
        itm = model.itm_head(enc).softmax(-1)[:, 1]
        torch.testing.assert_close(model.itm_scores(images, ids, mask), itm, atol=1e-5, rtol=1e-5)
        txt = F.normalize(model.text_proj(reference_text(model, ids, mask, "text")[:, 0]), dim=-1)
        torch.testing.assert_close(model.encode_text(ids, mask), txt, atol=1e-5, rtol=1e-5)


def test_what_each_mode_sees(fresh, batch):
    images, ids, mask = batch
    model = fresh
    other = torch.randn_like(images)
    changed = ids.clone()
    changed[:, 4] = 7  # a later token (every caption has at least six words)
    first = ids.clone()
    first[:, 0] = 9  # the start token
    with torch.no_grad():
        img, img2 = model.image_tokens(images), model.image_tokens(other)
        text = model.text(ids, mask)
        # text: no image at all (a context given to it is ignored), the start token's word embedding read
        assert torch.equal(model.text(ids, mask, "text", img2), text)
        assert not torch.allclose(model.text(first, mask)[:, 1], text[:, 1])
        # encoder: bidirectional (a later token changes the [ENC] output), grounded in the image, [ENC] marker
        enc = model.fuse(img, ids, mask)
        assert not torch.allclose(model.fuse(img, changed, mask)[:, 0], enc[:, 0], atol=1e-4)
        assert not torch.allclose(model.fuse(img2, ids, mask)[:, 0], enc[:, 0], atol=1e-4)
        torch.testing.assert_close(model.fuse(img, first, mask), enc)  # position 0 is the marker, not the word
        # decoder: causal (a later token changes nothing before it), grounded in the image, [DEC] marker
        dec = model.caption_logits(images, ids, mask)
        dec_changed = model.caption_logits(images, changed, mask)
        torch.testing.assert_close(dec_changed[:, :4], dec[:, :4])
        assert not torch.allclose(dec_changed[:, 4:], dec[:, 4:], atol=1e-4)
        assert not torch.allclose(model.caption_logits(other, ids, mask)[:, 0], dec[:, 0], atol=1e-4)
        torch.testing.assert_close(model.caption_logits(images, first, mask), dec)
        # the encoder's [ENC] and the decoder's [DEC] markers are distinct tensors, in neither the unimodal text
        assert not torch.allclose(model.text(ids, mask, "decoder", img)[:, 0], enc[:, 0], atol=1e-4)


def test_modes_share_cross_attention_and_feed_forward_not_self_attention(tokenizer, batch):
    """Which tensors each mode trains (gradients of a loss on one mode's output), and that the image-grounded
    modes hold the very same tensors for cross-attention and feed-forward."""
    images, ids, mask = batch
    model = _tiny(tokenizer, momentum=0.0)
    img = model.image_tokens(images).detach()

    def touched(mode: str) -> set[str]:
        model.zero_grad(set_to_none=True)
        model.text(ids, mask, mode, None if mode == "text" else img).pow(2).sum().backward()
        return {n for n, p in model.text.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}

    enc, dec, txt = touched("encoder"), touched("decoder"), touched("text")
    kinds = lambda names: {n.split(".")[2] for n in names if n.startswith("layers.")}  # noqa: E731
    assert kinds(enc) == {"ln_1", "self_attn", "ln_cross", "cross_attn", "ln_2", "mlp"}
    assert kinds(dec) == {"ln_causal", "causal_attn", "ln_cross", "cross_attn", "ln_2", "mlp"}
    assert kinds(txt) == {"ln_1", "self_attn", "ln_2", "mlp"}
    shared = {n for n in enc & dec if n.startswith("layers.")}
    assert {n.split(".")[2] for n in shared} == {"ln_cross", "cross_attn", "ln_2", "mlp"}
    assert "markers.encoder" in enc and "markers.decoder" in dec and "markers.encoder" not in dec
    assert {"embed.word_embed.weight", "embed.pos_embed", "norm.weight"} <= enc & dec & txt
    layer = model.text.layers[0]
    assert layer.causal_attn.in_proj.weight.data_ptr() != layer.self_attn.in_proj.weight.data_ptr()
    names = {n for n, _ in model.named_parameters()}
    assert not any("decoder" in n and "cross_attn" in n for n in names)  # one cross-attention per layer only
    assert len([n for n in names if ".cross_attn.q_proj.weight" in n]) == model.config.text_layers


# ---------------------------------------------------------------------------------------------- decoding
def test_cached_decoding_equals_teacher_forcing(fresh, batch):
    images, ids, mask = batch
    model = fresh
    with torch.no_grad():
        full = model.caption_logits(images, ids, mask)  # [batch, length, vocab]
        cache = model.start_decoding(images, max_length=ids.shape[1])
        steps = [model.decode_step(ids[:, :3], cache)]  # a prompt of three tokens at once, then one at a time
        steps += [model.decode_step(ids[:, t: t + 1], cache) for t in range(3, ids.shape[1])]
    assert len(cache.cross_kv) == model.config.text_layers and cache.length == ids.shape[1]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    spec = model.generation
    assert (spec.bos_token_id, spec.eos_token_id, spec.pad_token_id, spec.max_length) == (2, 3, 0, 32)
    # generate's cached decoding writes what the uncached reference writes (greedy and beam search, a prompt)
    for settings in (dict(num_beams=1), dict(num_beams=3, num_return_sequences=2), dict(prompt_ids=[5, 6])):
        cached = generate(model, images[:3], max_new_tokens=8, **settings)
        slow = generate(model, images[:3], max_new_tokens=8, use_cache=False, **settings)
        assert cached.sequences == slow.sequences, settings
        flat = lambda scores: [s for image in scores for s in image]  # noqa: E731
        assert flat(cached.scores) == pytest.approx(flat(slow.scores), abs=1e-4)
    with pytest.raises(VlkitError, match="context length"):
        model.start_decoding(images, max_length=33)


def test_heads_and_interfaces(fresh, batch):
    from vlkit.inference.interface import is_generative
    from vlkit.inference.matching import can_match

    images, ids, mask = batch
    model = fresh
    assert is_generative(model) and can_match(model)
    with torch.no_grad():
        out = model(images, ids, mask)
        assert isinstance(out, TwoTowerOutput) and out.logits_per_image.shape == (8, 8)
        scores = model(images, ids, mask, head="itm")
        assert scores.shape == (8,) and torch.equal(scores, model.itm_scores(images, ids, mask))
        features = model.match_features(images)
        # a pair's score does not depend on the other rows: score the pairs in another order and grouping
        order = torch.tensor([5, 2, 7, 0, 1, 6, 3, 4])
        part = torch.cat([model.match_scores(features[order[:3]], ids[order[:3]], mask[order[:3]]),
                          model.match_scores(features[order[3:]], ids[order[3:]], mask[order[3:]])])
        torch.testing.assert_close(part, scores[order], atol=1e-6, rtol=1e-5)
        assert model(images, ids, mask, head="cls").shape == (8, 64)
        assert model(images, ids, mask, head="caption").shape == (8, ids.shape[1], model.config.vocab_size)
        with pytest.raises(VlkitError, match="no answer head"):
            model(images, ids, mask, head="answer")
        with pytest.raises(VlkitError, match="unknown BLIP head"):
            model(images, ids, mask, head="mlm")
        answers = _tiny(build_word_tokenizer(CAPTIONS), answers=["yes", "no", "red"]).eval()
        assert answers(images, ids, mask, head="answer").shape == (8, 3)
    # the LM loss is the label-smoothed next-token cross-entropy of the caption logits, padding and [DEC] unscored
    other = _tiny(build_word_tokenizer(CAPTIONS), momentum=0.0)
    with torch.no_grad():
        out = other(images, ids, mask, head="pretrain", generator=torch.Generator().manual_seed(0))
        logits = other.caption_logits(images, ids, mask)[:, :-1]
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    want = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), label_smoothing=0.1)
    torch.testing.assert_close(out.lm, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, out.itc + out.itm + out.lm)


# ---------------------------------------------------------------------------------------------- training
def _train(model, batch, steps: int, lr: float = 3e-3, group_ids=None) -> list[dict[str, float]]:
    images, ids, mask = batch
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    history = []
    for _ in range(steps):
        out = model.pretrain_losses(images, ids, mask, group_ids, generator=g)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        model.momentum_step()
        history.append({k: float(v.detach()) for k, v in vars(out).items()})
    return history


@pytest.fixture(scope="module")
def overfit(tokenizer, batch):
    model = _tiny(tokenizer, momentum=0.0)
    history = _train(model, batch, 80)
    return model.eval(), history


def test_overfits_a_batch_and_writes_its_captions(overfit, batch, tokenizer):
    model, history = overfit
    images, ids, mask = batch
    first, last = history[0], history[-1]
    assert last["loss"] < 0.25 * first["loss"], (first, last)
    assert last["itc"] < 0.05 * first["itc"] and last["itm"] < 0.5 * first["itm"], (first, last)
    assert last["lm"] < 0.3 * first["lm"] and last["lm_accuracy"] == 1.0, (first, last)
    assert torch.isclose(torch.tensor(last["loss"]), torch.tensor(last["itc"] + last["itm"] + last["lm"]), atol=1e-5)
    with torch.no_grad():
        assert torch.equal(model(images, ids, mask).logits_per_image.argmax(-1), torch.arange(8))
        positive = model.itm_scores(images, ids, mask)
        negative = model.itm_scores(images, ids.roll(1, 0), mask.roll(1, 0))
    assert (positive > negative).float().mean() >= 0.75, (positive, negative)
    assert [t[0] for t in generate(model, images, max_new_tokens=12).texts(tokenizer)] == CAPTIONS
    assert [t[0] for t in generate(model, images, max_new_tokens=12, num_beams=3).texts(tokenizer)] == CAPTIONS


def test_itm_negatives_are_never_positives(tokenizer, batch, monkeypatch):
    """With group ids (two captions per image: pairs 2k and 2k + 1 share an image), no negative drawn for the
    matching loss is of the pair's own group, over many draws, with the momentum queue on."""
    import vlkit.models.blip.model as blip_model

    drawn = []
    real = blip_model.hard_negatives

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        drawn.append(out)
        return out

    monkeypatch.setattr(blip_model, "hard_negatives", spy)
    images, ids, mask = batch
    images = images.repeat_interleave(2, dim=0)[:8]  # pairs (0, 1), (2, 3), ... show one image
    groups = torch.arange(8) // 2
    model = _tiny(tokenizer).train()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _ in range(20):
            model.pretrain_losses(images, ids, mask, groups, generator=g)
    assert len(drawn) == 20
    text_neg = torch.stack([d.text_index for d in drawn])  # [draws, batch]
    image_neg = torch.stack([d.image_index for d in drawn])
    assert (groups[text_neg] != groups).all() and (groups[image_neg] != groups).all()
    assert len(set(text_neg.flatten().tolist())) == 8  # every row is drawn somewhere: not a fixed choice
    with pytest.raises(ValueError, match="negative"):
        model.pretrain_losses(images, ids, mask, torch.zeros(8, dtype=torch.long), generator=g)


def test_save_load_round_trip(tokenizer, batch, tmp_path):
    """A model with momentum encoders and queues (two training steps) saves and loads: every tensor, the
    embeddings, ITM scores and caption logits are equal."""
    images, ids, mask = batch
    model = _tiny(tokenizer, momentum=0.9, queue_size=12, answers=["yes", "no"])
    _train(model, batch, 2)
    assert int(model.image_queue.filled) == 12 and int(model.text_queue.ptr) == 4  # 16 rows into 12
    online = model.text.layers[0].cross_attn.q_proj.weight
    assert not torch.equal(online, model.momentum_encoders["text"].layers[0].cross_attn.q_proj.weight)
    model.eval()
    save_model(model, tmp_path / "blip", tokenizer)
    loaded = load_model(tmp_path / "blip").eval()
    assert type(loaded).__name__ == "BLIP" and loaded.config == model.config
    assert loaded.config.answers == ["yes", "no"]
    state = loaded.state_dict()
    assert set(state) == set(model.state_dict())
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name
    with torch.no_grad():
        for fn in ("itm_scores", "answer_logits", "caption_logits"):
            assert torch.equal(getattr(model, fn)(images, ids, mask), getattr(loaded, fn)(images, ids, mask)), fn
        assert torch.equal(model.encode_image(images), loaded.encode_image(images))
        assert torch.equal(model.encode_text(ids, mask), loaded.encode_text(ids, mask))
    fresh = create_model("blip-tiny", pretrained=tmp_path / "blip", vocab_size=tokenizer.vocab_size, momentum=0.9,
                         queue_size=12, answers=["yes", "no"])
    assert torch.equal(fresh.image_queue.features, model.image_queue.features)


def test_named_sizes_and_groups(fresh):
    from vlkit.models.blip.model import BLIPConfig
    from vlkit.train.optim import lr_group

    assert {"blip-tiny", "blip-base"} <= set(list_models("blip*"))
    c = BLIPConfig()
    assert (c.image_size, c.patch_size, c.vision_width, c.text_width, c.text_layers, c.text_heads) == \
        (224, 16, 768, 768, 12, 12)
    assert (c.vocab_size, c.embed_dim, c.queue_size, c.momentum, c.distill_alpha, c.label_smoothing) == \
        (30522, 256, 57600, 0.995, 0.4, 0.1)
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (101, 102, 0)
    assert lr_group(fresh, "visual.blocks.0.attn") == "image" and lr_group(fresh, "text.layers.0.mlp") == "text"
    assert lr_group(fresh, "itm_head.fc.weight") == "head"
    assert len(fresh.tower_blocks("text")) == 2 and len(fresh.tower_blocks("image")) == 2
    assert not any(p.requires_grad for p in fresh.momentum_encoders.parameters())


# ---------------------------------------------------------------------------------------------- the recipe
@pytest.fixture(scope="module")
def recipe_run(synth, tmp_path_factory):
    """`vlkit train blip_synth` (the shipped recipe) for a few steps on the synth fixture, with the captioning task
    beside itm."""
    import contextlib
    import io

    from vlkit.cli import main

    run = tmp_path_factory.mktemp("blip") / "run"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["train", "blip_synth", f"datasets.synth.path={synth}", f"output_dir={run}", "max_steps=4",
                     "progress=false", "tensorboard=false", "log_every=1",
                     "tasks=[{name: itm, dataset: synth}, {name: captioning, dataset: synth, eval_images: 4, "
                     "num_beams: 1, max_new_tokens: 6}]"])
    assert code == 0
    metrics = json.loads(out.getvalue())
    assert metrics["step"] == 4
    return run, metrics


def test_recipe_trains_through_itm_and_captioning_then_captions_and_evaluates(recipe_run, synth, capsys):
    from vlkit.cli import main

    run, metrics = recipe_run
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = {k for h in history for k in h}
    for name in ("itc", "itm", "lm", "itm_accuracy"):
        assert f"train/synth/itm/{name}" in logged, sorted(logged)
    assert "train/synth/captioning/caption_loss" in logged
    assert {"val/synth/rsum", "val/synth/itm_acc", "val/synth/cider"} <= set(metrics), sorted(metrics)
    image = sorted((synth.parent / "images").glob("*.png"))[0]
    assert main(["caption", str(run), str(image), "--beams", "2", "--max-new-tokens", "6", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["images"][0]["captions"][0]["caption"].strip()
    assert main(["eval", str(run), "--data", str(synth), "--split", "val", "--task", "retrieval", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["task"] == "retrieval" and 0 <= out["metrics"]["val/synth/t2i_r1"] <= 100, out
