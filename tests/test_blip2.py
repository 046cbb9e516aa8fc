"""BLIP-2: the Q-Former's three attention masks, the frozen image encoder, stage 1 (ITC + ITM + ITG) and stage 2
(a BERT decoder or a Hugging Face causal LM conditioned on the queries), weights in and out, decoding, and the
command line (``vlkit train`` through the itm and captioning tasks, then ``vlkit caption``)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from vlkit.data.text import build_word_tokenizer
from vlkit.errors import VlkitError
from vlkit.inference.captions import caption_inputs
from vlkit.inference.generate import generate
from vlkit.inference.interface import is_generative
from vlkit.inference.matching import can_match
from vlkit.models.blip2.image import FrozenImageEncoder
from vlkit.models.io import load_model, save_model
from vlkit.models.registry import create_model
from vlkit.modules.fusion.qformer import (MASK_KINDS, QFormer, hf_bert_sizes, load_hf_bert_into_qformer,
                                         qformer_attention_mask)
from vlkit.modules.losses.captioning import caption_labels, caption_loss

pytestmark = pytest.mark.usefixtures("one_thread")

CAPTIONS = ["a red circle", "two blue squares", "a green triangle above a circle", "an empty grey picture"]


def _batch(tokenizer, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=g)
    tokens = tokenizer(CAPTIONS[:n])
    return images, tokens["input_ids"], tokens["attention_mask"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer(CAPTIONS + ["question: what answer:"], max_length=16)


@pytest.fixture(scope="module")
def stage1(tokenizer):
    """A tiny stage-1 BLIP-2 fitted to four pairs; its losses before and after, and its frozen encoder's
    weights before training."""
    torch.manual_seed(0)
    model = create_model("blip2-tiny", vocab_size=tokenizer.vocab_size)
    images, ids, mask = _batch(tokenizer)
    frozen = {k: v.clone() for k, v in model.image_encoder.visual.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    first = None
    model.train()
    for _ in range(100):
        out = model.pretrain_losses(images, ids, mask, generator=g)
        first = first or {k: float(getattr(out, k).detach()) for k in ("itc", "itm", "lm")}
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():  # the ITM loss depends on the negatives drawn: its mean over several draws
        outs = [model.pretrain_losses(images, ids, mask, generator=torch.Generator().manual_seed(s)) for s in range(4)]
    last = {k: sum(float(getattr(o, k)) for o in outs) / len(outs) for k in ("itc", "itm", "lm")}
    return model, first, last, frozen


# --------------------------------------------------------------------------- masks
def _slow_mask(kind, q, text_mask):
    """The mask by its definition, one (row, key) at a time."""
    batch, length = text_mask.shape
    n = q + length
    out = torch.zeros(batch, n, n, dtype=torch.bool)
    for b in range(batch):
        for i in range(n):
            for j in range(n):
                key_real = j < q or bool(text_mask[b, j - q])
                if kind == "bidirectional":
                    ok = True
                elif kind == "unimodal":
                    ok = (i < q) == (j < q)
                else:
                    ok = j < q if i < q else (j < q or j <= i)
                out[b, i, j] = (ok and key_real) or i == j
    return out


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_mask_equals_its_definition(kind):
    text_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert torch.equal(qformer_attention_mask(kind, 3, text_mask), _slow_mask(kind, 3, text_mask))


def test_masks_do_what_they_claim(tokenizer):
    torch.manual_seed(1)
    model = create_model("blip2-tiny", vocab_size=tokenizer.vocab_size).eval()
    images, ids, mask = _batch(tokenizer)
    other_images = torch.randn_like(images)
    later = ids.clone()
    later[:, 3:] = torch.randint(5, tokenizer.vocab_size, later[:, 3:].shape)  # change every token after the third
    qf = model.qformer
    with torch.no_grad():
        img, img2 = model.image_tokens(images), model.image_tokens(other_images)
        alone = qf(img).queries
        # ITC: the text does not see the image, the queries do not see the text
        uni = qf(img, ids, mask, "unimodal")
        assert torch.allclose(uni.text, qf(img2, ids, mask, "unimodal").text, atol=1e-6)
        assert torch.allclose(uni.text, qf(None, ids, mask, queries=False).text, atol=1e-5)
        assert torch.allclose(uni.queries, alone, atol=1e-5)
        assert not torch.allclose(uni.queries, qf(img2, ids, mask, "unimodal").queries, atol=1e-3)
        assert torch.allclose(model.encode_text(ids, mask), model.encode_text(ids, mask), atol=0)
        # ITG: the queries do not see the text; a text token sees no later token, but does see the image
        dec = model.dec_embedding
        causal = qf(img, ids, mask, "causal", first_embedding=dec)
        causal_later = qf(img, later, mask, "causal", first_embedding=dec)
        assert torch.allclose(causal.queries, alone, atol=1e-5)
        assert torch.allclose(causal.text[:, :3], causal_later.text[:, :3], atol=1e-5)
        assert not torch.allclose(causal.text[:, 3:], causal_later.text[:, 3:], atol=1e-3)
        assert not torch.allclose(causal.text[:, :3], qf(img2, ids, mask, "causal", first_embedding=dec).text[:, :3],
                                  atol=1e-3)
        # ITM: everything sees everything
        bi, bi_later = qf(img, ids, mask, "bidirectional"), qf(img, later, mask, "bidirectional")
        assert not torch.allclose(bi.queries, alone, atol=1e-3)
        assert not torch.allclose(bi.text[:, :3], bi_later.text[:, :3], atol=1e-3)
        assert not torch.allclose(bi.text, qf(img2, ids, mask, "bidirectional").text, atol=1e-3)


def test_frozen_image_encoder_gets_no_gradient_and_keeps_its_statistics(tokenizer):
    torch.manual_seed(2)
    model = create_model("blip2-tiny", vocab_size=tokenizer.vocab_size).train()
    model.pretrain_losses(*_batch(tokenizer)).loss.backward()
    visual = list(model.image_encoder.visual.parameters())
    assert visual and all(not p.requires_grad and p.grad is None for p in visual)
    assert model.image_encoder.norm.weight.grad is not None  # BLIP-2's ln_vision trains
    from vlkit.train.optim import lr_group

    groups = {n: lr_group(model, n) for n, p in model.named_parameters() if p.requires_grad}
    assert groups["qformer.layers.1.ffn.mlps.query.fc1.weight"] == "text" == groups["qformer.embed.pos_embed"]
    assert groups["qformer.query_tokens"] == "head" == groups["qformer.layers.0.cross_attn.q_proj.weight"]
    assert groups["image_encoder.norm.weight"] == "image" and len(groups) < len(list(model.parameters()))
    cnn = FrozenImageEncoder("efficientnet_lite0", 64, pretrained=False).train()
    stats = {k: v.clone() for k, v in cnn.visual.state_dict().items()}
    tokens = cnn(torch.randn(2, 3, 64, 64))
    assert tokens.shape == (2, 4, 1280) and not cnn.visual.training
    assert all(torch.equal(stats[k], v) for k, v in cnn.visual.state_dict().items())


def test_itc_similarity_is_the_max_over_queries():
    torch.manual_seed(3)
    model = create_model("blip2-tiny")
    img = F.normalize(torch.randn(3, 8, 32), dim=-1)
    txt = F.normalize(torch.randn(5, 32), dim=-1)
    slow = torch.tensor([[max(float(img[i, q] @ txt[t]) for q in range(8)) for t in range(5)] for i in range(3)])
    assert torch.allclose(model.similarity(img, txt), slow, atol=1e-6)


def test_qformer_from_minilm_text_pass_equals_the_bert():
    from transformers import AutoModel

    from vlkit.modules.encoders.hf_text import resolve_text_encoder_path

    path = resolve_text_encoder_path("minilm")
    sizes = hf_bert_sizes(path)
    qformer = QFormer(sizes["vocab_size"], sizes["width"], sizes["layers"], sizes["heads"], sizes["mlp_dim"], 4, 16,
                      max_positions=32, act=sizes["act"], norm_eps=sizes["norm_eps"]).eval()
    load_hf_bert_into_qformer(qformer, path)
    bert = AutoModel.from_pretrained(path, local_files_only=True).eval()
    ids = torch.tensor([[101, 7592, 2088, 2003, 102, 0], [101, 1037, 2417, 4418, 2006, 102]])
    mask = (ids != 0).long()
    with torch.no_grad():
        ours = qformer(None, ids, mask, queries=False).text
        ref = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.allclose(ours[mask.bool()], ref[mask.bool()], atol=1e-4)
    layer = qformer.layers[0]
    assert torch.equal(layer.ffn.mlps["query"].fc1.weight, layer.ffn.mlps["text"].fc1.weight)
    assert qformer.layers[0].cross_attn is not None and qformer.layers[1].cross_attn is None
    assert sum(layer.cross_attn is not None for layer in qformer.layers) == 3  # every other layer of six


# --------------------------------------------------------------------------- stage 1
def test_stage1_overfits_and_frozen_encoder_does_not_move(stage1):
    model, first, last, frozen = stage1
    assert last["itc"] < 0.05 * first["itc"] and last["lm"] < 0.1 * first["lm"], (first, last)
    assert last["itm"] < 0.3 * first["itm"], (first, last)
    assert all(torch.equal(frozen[k], v) for k, v in model.image_encoder.visual.state_dict().items())


def test_stage1_retrieval_and_matching(stage1, tokenizer):
    model, *_ = stage1
    images, ids, mask = _batch(tokenizer)
    assert can_match(model) and not is_generative(model)
    with torch.no_grad():
        sims = model.encode_image(images) @ model.encode_text(ids, mask).T
        feats = model.match_features(images)
        pos = model.match_scores(feats, ids, mask)
        neg = model.match_scores(feats, ids.roll(1, 0), mask.roll(1, 0))
        one = model.match_scores(feats[1:2], ids[1:2], mask[1:2])  # independent of the other rows
    assert torch.equal(sims.argmax(dim=1), torch.arange(4))
    assert bool((pos > 0.5).all()) and bool((neg < 0.5).all())
    assert torch.allclose(one, pos[1:2], atol=1e-5)
    assert torch.allclose(model(images, ids, mask, head="itm"), pos, atol=1e-6)


def test_save_load_round_trip_and_stage2_from_stage1(stage1, tokenizer, tmp_path):
    model, *_ = stage1
    images, ids, mask = _batch(tokenizer)
    save_model(model, tmp_path / "s1", tokenizer=tokenizer)
    loaded = load_model(tmp_path / "s1").eval()
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), model.encode_image(images))
        assert torch.equal(loaded.itm_scores(images, ids, mask), model.itm_scores(images, ids, mask))
    s2 = create_model("blip2-tiny", pretrained=tmp_path / "s1", vocab_size=tokenizer.vocab_size, stage=2,
                      language_model="bert")
    own = model.state_dict()
    assert all(torch.equal(v, own[k]) for k, v in s2.state_dict().items() if not k.startswith("language."))
    assert is_generative(s2) and s2.generation.vocab_size == tokenizer.vocab_size
    with pytest.raises(VlkitError, match="vocab_size"):
        create_model("blip2-tiny", pretrained=tmp_path / "s1", stage=2, language_model="bert")
    state = {k: v for k, v in own.items() if k != "itm_head.fc.bias"}
    from safetensors.torch import save_file

    save_file({**state, "extra.weight": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(VlkitError, match=r"itm_head\.fc\.bias.*extra\.weight"):
        create_model("blip2-tiny", pretrained=tmp_path / "bad.safetensors", vocab_size=tokenizer.vocab_size)


# --------------------------------------------------------------------------- stage 2
def _fit_stage2(model, tokenizer, images, texts, steps):
    tokens = caption_inputs(tokenizer, model.generation, texts)
    labels = caption_labels(tokens.input_ids, tokens.attention_mask)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        loss = caption_loss(model(images, tokens.input_ids, tokens.attention_mask, head="caption"), labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return model.eval(), losses


def _check_writes_and_caches(model, tokenizer, images, texts):
    out = generate(model, images, max_new_tokens=12)
    assert [tokenizer.decode(seq[0]) for seq in out.sequences] == texts
    tokens = caption_inputs(tokenizer, model.generation, texts)
    with torch.no_grad():
        full = model.caption_logits(images, tokens.input_ids, tokens.attention_mask)
        cache = model.start_decoding(images, tokens.input_ids.shape[1])
        steps = [model.decode_step(tokens.input_ids[:, :3], cache)]  # a prompt of three, then one at a time
        steps += [model.decode_step(tokens.input_ids[:, t:t + 1], cache) for t in range(3, tokens.input_ids.shape[1])]
    real = tokens.attention_mask.bool()
    assert torch.allclose(torch.cat(steps, dim=1)[real], full[real], atol=1e-4)


def test_stage2_bert_decoder_writes_the_captions(stage1, tokenizer, tmp_path):
    model, *_ = stage1
    save_model(model, tmp_path / "s1", tokenizer=tokenizer)
    torch.manual_seed(4)
    s2 = create_model("blip2-tiny", pretrained=tmp_path / "s1", vocab_size=tokenizer.vocab_size, stage=2,
                      language_model="bert")
    frozen = {k: v.clone() for k, v in s2.image_encoder.visual.state_dict().items()}
    images = _batch(tokenizer)[0][:2]
    s2, losses = _fit_stage2(s2, tokenizer, images, CAPTIONS[:2], 60)
    assert losses[-1] < 0.05 * losses[0]
    _check_writes_and_caches(s2, tokenizer, images, CAPTIONS[:2])
    assert all(torch.equal(frozen[k], v) for k, v in s2.image_encoder.visual.state_dict().items())
    save_model(s2, tmp_path / "s2", tokenizer=tokenizer)
    again = load_model(tmp_path / "s2")
    tokens = caption_inputs(tokenizer, s2.generation, CAPTIONS[:2])
    with torch.no_grad():
        assert torch.equal(again.caption_logits(images, tokens.input_ids, tokens.attention_mask),
                           s2.caption_logits(images, tokens.input_ids, tokens.attention_mask))


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, tokenizer):
    """A tiny random GPT-2 and a word-level tokenizer saved as a local Hugging Face directory."""
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(5)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=tokenizer.vocab_size,
                        bos_token_id=tokenizer.token_id("[CLS]"), eos_token_id=tokenizer.token_id("[SEP]"),
                        pad_token_id=tokenizer.token_id("[PAD]"), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    lm = GPT2LMHeadModel(config)
    # a "pretrained" language model: fitted to the captions alone, so the queries only have to pick one
    rows = [[config.bos_token_id, *tokenizer.encode_plain(c), config.eos_token_id] for c in CAPTIONS]
    ids = torch.tensor([r + [config.pad_token_id] * (8 - len(r)) for r in rows])
    labels = torch.where(ids == config.pad_token_id, -100, ids)
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-2)
    for _ in range(60):
        loss = lm(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    lm.save_pretrained(path)
    tokenizer.save(path)
    return path


def test_stage2_causal_lm_writes_the_captions(stage1, tokenizer, gpt2_dir, tmp_path):
    model, *_ = stage1
    save_model(model, tmp_path / "s1", tokenizer=tokenizer)
    torch.manual_seed(6)
    s2 = create_model("blip2-tiny", pretrained=tmp_path / "s1", vocab_size=tokenizer.vocab_size, stage=2,
                      language_model=str(gpt2_dir))
    assert s2.preprocess.tokenizer == str(gpt2_dir)
    lm_before = {k: v.clone() for k, v in s2.language.lm.state_dict().items()}
    assert not any(p.requires_grad for p in s2.language.lm.parameters())
    images = _batch(tokenizer)[0][:2]
    s2, losses = _fit_stage2(s2, tokenizer, images, CAPTIONS[:2], 80)
    assert losses[-1] < 0.1 * losses[0]
    assert all(torch.equal(lm_before[k], v) for k, v in s2.language.lm.state_dict().items())
    _check_writes_and_caches(s2, tokenizer, images, CAPTIONS[:2])
    save_model(s2, tmp_path / "s2")
    again = load_model(tmp_path / "s2")
    tokens = caption_inputs(tokenizer, s2.generation, CAPTIONS[:2])
    with torch.no_grad():
        assert torch.equal(again.caption_logits(images, tokens.input_ids, tokens.attention_mask),
                           s2.caption_logits(images, tokens.input_ids, tokens.attention_mask))


# --------------------------------------------------------------------------- command line
def test_train_stage1_then_stage2_then_caption(synth, tmp_path, capsys):
    from vlkit.cli import main

    common = [f"datasets={{synth: {{path: {synth}}}}}", "batch_size=16", "progress=false", "epochs=1",
              "precision=fp32", "optim.warmup_steps=1"]
    stage1_cfg = tmp_path / "s1.yaml"
    stage1_cfg.write_text("model: {name: blip2-tiny}\ntasks: [{name: itm, dataset: synth}]\n")
    assert main(["train", str(stage1_cfg), *common, "max_steps=3", f"output_dir={tmp_path / 's1'}"]) == 0
    saved = json.loads((tmp_path / "s1" / "model" / "config.json").read_text())["config"]
    assert saved["stage"] == 1 and (tmp_path / "s1" / "model" / "tokenizer.json").exists()
    stage2_cfg = tmp_path / "s2.yaml"
    stage2_cfg.write_text(
        f"model: {{name: blip2-tiny, pretrained: {tmp_path / 's1' / 'model'}, args: {{stage: 2, language_model: bert"
        f"}}}}\ntasks: [{{name: captioning, dataset: synth, eval_images: 4, "
        f"max_new_tokens: 5}}]\n")
    assert main(["train", str(stage2_cfg), *common, "max_steps=2", f"output_dir={tmp_path / 's2'}"]) == 0
    model = load_model(tmp_path / "s2" / "model")
    assert model.config.stage == 2 and is_generative(model)
    assert model.config.vocab_size == saved["vocab_size"]  # the stage-1 vocabulary, read from its saved config
    capsys.readouterr()
    image = sorted((synth.parent / "images").glob("*.png"))[0]
    assert main(["caption", str(tmp_path / "s2"), str(image), "--json", "--max-new-tokens", "5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert isinstance(out["images"][0]["captions"][0]["caption"], str)


def test_named_sizes():
    from vlkit.models.registry import list_models

    assert list_models("blip2*") == ["blip2-base", "blip2-lite0-minilm", "blip2-tiny"]
    model = create_model("blip2-tiny")
    c = model.config
    assert (c.num_queries, c.width, c.layers, c.image_size, c.stage) == (8, 64, 2, 32, 1)
    assert model.qformer.query_tokens.shape == (8, 64) and model.generation is None
    with pytest.raises(VlkitError, match="language_model"):
        create_model("blip2-tiny", stage=2)
