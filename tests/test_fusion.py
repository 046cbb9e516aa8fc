"""Fusion building blocks (cross-attention encoder, ITM mining, whole-word MLM, momentum distillation) and the
fusion models ALBEF and ViLT at tiny sizes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vlkit
from vlkit.data.text import TextTokenizer, build_word_tokenizer
from vlkit.models.io import load_model, save_model
from vlkit.modules.fusion import (
    FusionEncoder,
    FusionLayer,
    MLMHead,
    distilled_cross_entropy,
    hard_negatives,
    itm_loss,
    mask_tokens,
    mlm_loss,
    momentum_itc_loss,
    random_negatives,
    soft_cross_entropy,
    word_ids_from_encodings,
    word_ids_per_token,
)
from vlkit.modules.losses import contrastive_loss

MASK_ID, VOCAB = 999, 1000
CLS, SEP, PAD = 2, 3, 0


def unit(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


# ---------------------------------------------------------------- whole-word masking


def word_level_batch(rows: int, length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] words [SEP] [PAD]..., random lengths, word ids in [4, 900)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 900, (rows, length), generator=g)
    lengths = torch.randint(3, length + 1, (rows,), generator=g)
    pos = torch.arange(length)[None]
    mask = (pos < lengths[:, None]).long()
    ids = torch.where(mask.bool(), ids, PAD)
    ids[:, 0] = CLS
    ids[torch.arange(rows), lengths - 1] = SEP
    return ids, mask


def test_mask_tokens_statistics_and_invariants():
    ids, mask = word_level_batch(3000, 20)
    g = torch.Generator().manual_seed(1)
    out = mask_tokens(ids, mask, None, MASK_ID, VOCAB, 0.15, g, special_ids=(PAD, CLS, SEP))
    chosen = out.labels != -100
    maskable = mask.bool() & (ids != CLS) & (ids != SEP)
    assert not (chosen & ~maskable).any()  # never special tokens or padding
    assert torch.equal(out.labels[chosen], ids[chosen])
    assert torch.equal(out.input_ids[~chosen], ids[~chosen])  # only chosen tokens change
    rate = chosen.sum().item() / maskable.sum().item()
    assert abs(rate - 0.15) < 0.01
    new, old = out.input_ids[chosen], ids[chosen]
    n = chosen.sum().item()  # about 5000
    to_mask = (new == MASK_ID).sum().item() / n
    to_random = ((new != MASK_ID) & (new != old)).sum().item() / n
    unchanged = (new == old).sum().item() / n
    assert abs(to_mask - 0.8) < 0.02 and abs(to_random - 0.1) < 0.015 and abs(unchanged - 0.1) < 0.015
    assert (new[(new != MASK_ID) & (new != old)] < VOCAB).all()
    # the same generator state gives the same masks; word ids per token are equivalent to None
    again = mask_tokens(ids, mask, word_ids_per_token(ids, mask, (PAD, CLS, SEP)), MASK_ID, VOCAB, 0.15,
                        torch.Generator().manual_seed(1), special_ids=(PAD, CLS, SEP))
    assert torch.equal(again.labels, out.labels) and torch.equal(again.input_ids, out.input_ids)


@pytest.fixture(scope="module")
def minilm_tokenizer():
    from vlkit.modules.encoders.hf_text import resolve_text_encoder_path

    try:
        path = resolve_text_encoder_path("minilm")
    except Exception as exc:  # the package is a test dependency; skip cleanly without it
        pytest.skip(str(exc))
    return TextTokenizer(path, max_length=32)


def test_whole_words_masked_together(minilm_tokenizer):
    tok = minilm_tokenizer
    texts = ["unbelievably photosynthesis skateboarding", "a dog chases the frisbee on snowboards",
             "short", "hyperparameters of transformers are overwhelmingly uncharted"] * 250
    batch = tok(texts)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    words = word_ids_from_encodings(tok.tokenizer.encode_batch(texts), ids.shape[1])  # [rows, length]
    assert words.shape == ids.shape and (words[mask == 0] == -1).all()
    specials = [tok.tokenizer.token_to_id(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")]
    mask_id = tok.tokenizer.token_to_id("[MASK]")
    out = mask_tokens(ids, mask, words, mask_id, tok.vocab_size, 0.3, torch.Generator().manual_seed(0), specials)
    chosen = out.labels != -100
    assert not chosen[(words < 0) | (mask == 0)].any()  # [CLS], [SEP], padding
    multi_token_words, chosen_words, n_words = 0, 0, 0
    for r in range(ids.shape[0]):
        for w in words[r].unique().tolist():
            if w < 0:
                continue
            picked = chosen[r][words[r] == w]
            assert picked.all() or not picked.any(), f"row {r} word {w}: partly masked"
            n_words += 1
            chosen_words += int(picked.all())
            multi_token_words += int(picked.all() and picked.numel() > 1)
    assert multi_token_words > 100
    assert abs(chosen_words / n_words - 0.3) < 0.03
    # a boolean word-start mask groups the same tokens
    starts = (words >= 0) & (words != F.pad(words, (1, 0), value=-1)[:, :-1])
    again = mask_tokens(ids, mask, starts, mask_id, tok.vocab_size, 0.3, torch.Generator().manual_seed(0), specials)
    assert torch.equal(again.labels != -100, chosen)


def test_mlm_head_tied_and_loss():
    torch.manual_seed(0)
    emb = nn.Embedding(50, 16)
    head = MLMHead(16, 50, tied=True)
    assert head.decoder_weight is None
    hidden = torch.randn(2, 5, 16)
    logits = head(hidden, emb.weight)  # [2, 5, 50]
    labels = torch.full((2, 5), -100)
    labels[0, 1], labels[1, 3] = 7, 9
    out = mlm_loss(logits, labels)
    expected = F.cross_entropy(logits.reshape(-1, 50), labels.reshape(-1))
    assert out.num_predicted == 2 and torch.allclose(out.loss, expected, atol=1e-6)
    out.loss.backward()
    assert emb.weight.grad is not None and emb.weight.grad.abs().sum() > 0
    empty = mlm_loss(logits.detach(), torch.full((2, 5), -100))
    assert empty.num_predicted == 0 and empty.loss.item() == 0.0


# ---------------------------------------------------------------- ITM negatives


def test_hard_negatives_never_positive_and_follow_similarity():
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(6, 6, generator=g) * 2
    groups = torch.tensor([0, 0, 1, 2, 2, 3])
    positive = groups[:, None] == groups[None, :]
    draws = 3000
    counts_i2t = torch.zeros(6, 6)
    counts_t2i = torch.zeros(6, 6)
    for _ in range(draws):
        neg = hard_negatives(sim, sim.T, groups, g)
        counts_i2t[torch.arange(6), neg.text_index] += 1
        counts_t2i[torch.arange(6), neg.image_index] += 1
    assert counts_i2t[positive].sum() == 0 and counts_t2i[positive].sum() == 0
    for counts, logits in ((counts_i2t, sim), (counts_t2i, sim.T)):
        expected = logits.masked_fill(positive, float("-inf")).softmax(dim=1) * draws
        for row in range(6):
            cols = ~positive[row]
            chi2 = ((counts[row, cols] - expected[row, cols]) ** 2 / expected[row, cols]).sum().item()
            dof = int(cols.sum()) - 1
            assert chi2 < dof + 5 * math.sqrt(2 * dof) + 5, (row, chi2, dof)  # far beyond p = 0.001
    # without groups only the diagonal is excluded
    neg = hard_negatives(sim, sim.T, None, g)
    assert (neg.text_index != torch.arange(6)).all() and (neg.image_index != torch.arange(6)).all()
    with pytest.raises(ValueError):
        hard_negatives(sim, sim.T, torch.zeros(6, dtype=torch.long), g)


def test_random_negatives_uniform_over_other_groups():
    g = torch.Generator().manual_seed(0)
    groups = torch.tensor([0, 0, 1, 2])
    counts = torch.zeros(4, 4)
    for _ in range(800):
        counts[torch.arange(4), random_negatives(4, groups, g)] += 1
    assert counts[groups[:, None] == groups[None, :]].sum() == 0
    assert abs(counts[0, 2] - counts[0, 3]) < 120 and counts[0, 2] > 300


def test_itm_loss_labels_and_accuracy():
    pos = torch.tensor([[0.0, 3.0], [2.0, 0.0]])
    neg = torch.tensor([[3.0, 0.0], [3.0, 0.0]])
    out = itm_loss(pos, neg)
    assert out.labels.tolist() == [1, 1, 0, 0]
    assert out.accuracy.item() == 0.75
    assert torch.allclose(out.loss, F.cross_entropy(torch.cat([pos, neg]), out.labels))


# ---------------------------------------------------------------- fusion layer


def test_fusion_layer_matches_torch_multihead_attention():
    torch.manual_seed(0)
    dim, heads, ctx_dim = 16, 4, 24
    layer = FusionLayer(dim, heads, ctx_dim).eval()
    x, ctx = torch.randn(3, 5, dim), torch.randn(3, 7, ctx_dim)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])

    sa = nn.MultiheadAttention(dim, heads, batch_first=True)
    ca = nn.MultiheadAttention(dim, heads, kdim=ctx_dim, vdim=ctx_dim, batch_first=True)
    with torch.no_grad():
        sa.in_proj_weight.copy_(layer.self_attn.in_proj.weight)
        sa.in_proj_bias.copy_(layer.self_attn.in_proj.bias)
        sa.out_proj.load_state_dict(layer.self_attn.out_proj.state_dict())
        ca.q_proj_weight.copy_(layer.cross_attn.q_proj.weight)
        ca.k_proj_weight.copy_(layer.cross_attn.kv_proj.weight[:dim])
        ca.v_proj_weight.copy_(layer.cross_attn.kv_proj.weight[dim:])
        ca.in_proj_bias.copy_(torch.cat([layer.cross_attn.q_proj.bias, layer.cross_attn.kv_proj.bias]))
        ca.out_proj.load_state_dict(layer.cross_attn.out_proj.state_dict())
        h = layer.ln_1(x)
        ref = x + sa(h, h, h, key_padding_mask=mask == 0, need_weights=False)[0]  # bidirectional, padding masked
        h = layer.ln_cross(ref)
        ref = ref + ca(h, ctx, ctx, need_weights=False)[0]
        ref = ref + layer.mlp(layer.ln_2(ref))
        out = layer(x, ctx, key_padding_mask=mask)
    assert torch.allclose(out, ref, atol=1e-5)
    # not causal: the first token sees the last one
    x2 = x.clone()
    x2[0, -1] += torch.randn(dim)  # (a constant shift would vanish in the LayerNorm)
    assert not torch.allclose(layer(x2, ctx, mask)[0, 0], out[0, 0])


def test_fusion_encoder_ignores_padding():
    torch.manual_seed(0)
    enc = FusionEncoder.build(16, 2, 4, context_dim=8).eval()
    x, ctx = torch.randn(2, 4, 16), torch.randn(2, 6, 8)
    mask = torch.ones(2, 4, dtype=torch.long)
    longer = torch.cat([x, torch.randn(2, 3, 16)], dim=1)
    longer_mask = torch.cat([mask, torch.zeros(2, 3, dtype=torch.long)], dim=1)
    with torch.no_grad():
        assert torch.allclose(enc(x, ctx, mask), enc(longer, ctx, longer_mask)[:, :4], atol=1e-5)


# ---------------------------------------------------------------- distillation


def test_distillation_alpha_zero_is_the_contrastive_loss():
    img, txt = unit(6, 8, seed=1), unit(6, 8, seed=2)
    scale = torch.tensor(10.0)
    empty = torch.zeros(0, 8)
    for groups in (None, torch.tensor([0, 0, 1, 2, 3, 3])):
        out = momentum_itc_loss(img, txt, img.detach(), txt.detach(), empty, empty, scale, alpha=0.0, group_ids=groups)
        ref = contrastive_loss(img, txt, scale, groups)
        assert torch.allclose(out.loss, ref.loss, atol=1e-6)
        assert torch.allclose(out.image_to_text, ref.image_to_text, atol=1e-6)


def test_distillation_alpha_one_is_soft_cross_entropy_by_hand():
    img, txt, img_m, txt_m = unit(4, 8, seed=1), unit(4, 8, seed=2), unit(4, 8, seed=3), unit(4, 8, seed=4)
    q_img, q_txt = unit(5, 8, seed=5), unit(5, 8, seed=6)
    scale = torch.tensor(7.0)
    out = momentum_itc_loss(img, txt, img_m, txt_m, q_img, q_txt, scale, alpha=1.0)
    texts, images = torch.cat([txt_m, q_txt]), torch.cat([img_m, q_img])  # [9, 8]

    def by_hand(student, teacher, cands):
        total = 0.0
        for i in range(student.shape[0]):
            t = [math.exp(scale.item() * float(teacher[i] @ c)) for c in cands]
            s = [scale.item() * float(student[i] @ c) for c in cands]
            log_z = math.log(sum(math.exp(v) for v in s))
            total += -sum(tj / sum(t) * (sj - log_z) for tj, sj in zip(t, s))
        return total / student.shape[0]

    assert out.image_to_text.item() == pytest.approx(by_hand(img, img_m, texts), rel=1e-5)
    assert out.text_to_image.item() == pytest.approx(by_hand(txt, txt_m, images), rel=1e-5)
    # in between, the loss mixes linearly: (1 - a) * hard + a * soft
    logits, teacher = torch.randn(3, 6), torch.randn(3, 6)
    labels = torch.tensor([0, 4, 2])
    mixed = distilled_cross_entropy(logits, labels, teacher, 0.4)
    expected = 0.6 * F.cross_entropy(logits, labels) + 0.4 * soft_cross_entropy(logits, teacher.softmax(-1))
    assert torch.allclose(mixed, expected, atol=1e-6)
    assert torch.allclose(mlm_loss(logits, labels, teacher, 0.4).loss, expected, atol=1e-6)


# ---------------------------------------------------------------- the tiny models


CAPTIONS = ["a red circle on the left", "a blue square at the top", "a green triangle in the middle",
            "a yellow circle at the bottom", "a red square on the right", "a blue triangle on the left",
            "a green circle at the top", "a yellow square in the middle"]


@pytest.fixture(scope="module")
def batch():
    """8 synthetic images (a coloured block at a caption-specific place) with their captions."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(8, 3, 32, 32, generator=g) * 0.1
    for i in range(8):
        r, c = divmod(i, 4)
        images[i, i % 3, 16 * r: 16 * r + 16, 8 * c: 8 * c + 8] += 2.0
    tok = build_word_tokenizer(CAPTIONS, max_length=32)
    text = tok(CAPTIONS)
    return images, text["input_ids"], text["attention_mask"]


def make(name: str, **overrides) -> nn.Module:
    torch.manual_seed(0)
    return vlkit.create_model(name, **overrides)


def train_steps(model: nn.Module, batch, steps: int, lr: float = 3e-3) -> list[float]:
    images, ids, mask = batch
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        out = model.pretrain_losses(images, ids, mask, generator=g)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        model.momentum_step() if hasattr(model, "momentum_step") else None
        losses.append(out.loss.item())
    return losses


def fixed_loss(model: nn.Module, batch) -> float:
    images, ids, mask = batch
    with torch.no_grad():
        return model.pretrain_losses(images, ids, mask, generator=torch.Generator().manual_seed(7)).loss.item()


def test_albef_shapes_and_outputs(batch):
    images, ids, mask = batch
    model = make("albef-tiny", answers=["yes", "no", "red"]).eval()
    with torch.no_grad():
        img_emb, txt_emb = model.encode_image(images), model.encode_text(ids, mask)
        assert img_emb.shape == (8, 32) and txt_emb.shape == (8, 32)
        assert torch.allclose(txt_emb.norm(dim=-1), torch.ones(8), atol=1e-5)
        assert torch.allclose(model.encode_text(ids), txt_emb, atol=1e-6)  # mask derived from the pad id
        tokens = model.image_tokens(images)
        assert tokens.shape == (8, 1 + 16, 64)
        assert torch.allclose(model.vision_proj(tokens[:, 0]), model.encode_image(images, normalize=False), atol=1e-5)
        assert model.fuse(tokens, ids, mask).shape == (8, ids.shape[1], 64)
        scores = model.itm_scores(images, ids, mask)
        assert scores.shape == (8,) and ((scores > 0) & (scores < 1)).all()
        assert model.answer_logits(images, ids, mask).shape == (8, 3)
        assert model(images, ids, mask).logits_per_image.shape == (8, 8)  # default head: the two towers
        assert torch.equal(model(images, ids, mask, head="itm"), scores)
        assert model(images, ids, mask, head="answer").shape == (8, 3)
        with pytest.raises(vlkit.errors.VlkitError):
            model(images, ids, mask, head="nope")
    out = model.train()(images, ids, mask, head="pretrain", group_ids=torch.arange(8) // 2,
                        generator=torch.Generator().manual_seed(0))
    assert type(out).__name__ == "ALBEFOutput"
    assert torch.allclose(out.loss, out.itc + out.itm + out.mlm)
    assert all(torch.isfinite(v) for v in (out.loss, out.itm_accuracy, out.mlm_accuracy))
    out.loss.backward()
    assert model.text_encoder.word_embeddings.weight.grad is not None
    assert not any(p.requires_grad for p in model.momentum_encoders.parameters())
    with pytest.raises(vlkit.errors.VlkitError):
        make("albef-tiny").answer_logits(images, ids, mask)


def test_albef_overfits_a_batch(batch):
    model = make("albef-tiny", momentum=0.0)
    before = fixed_loss(model.train(), batch)
    train_steps(model, batch, 25)
    after = fixed_loss(model, batch)
    assert after < 0.7 * before, (before, after)
    # with momentum encoders, queues and distillation the loss falls too (more slowly: the teacher moves at
    # momentum 0.995 and the queue fills with copies of this very batch, so its floor is higher)
    model = make("albef-tiny")
    losses = train_steps(model, batch, 25)
    assert sum(losses[-5:]) < 0.9 * sum(losses[:5]), losses


def test_albef_momentum_and_queue(batch):
    images, ids, mask = batch
    model = make("albef-tiny", momentum=0.9, queue_size=12).train()
    online, target = model.visual.patch_embed.proj.weight, model.momentum_encoders["visual"].patch_embed.proj.weight
    assert torch.equal(online, target)

    def momentum_feats():
        with torch.no_grad():
            m = model.momentum_encoders
            img = F.normalize(m["vision_proj"](model._image_tokens(m["visual"], images)[:, 0]), dim=-1)
            txt = F.normalize(m["text_proj"](m["text_encoder"](ids, mask)[:, 0]), dim=-1)
        return img, txt

    first_img, first_txt = momentum_feats()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.pretrain_losses(images, ids, mask, generator=torch.Generator().manual_seed(0)).loss.backward()
    assert int(model.image_queue.ptr) == 8 and int(model.image_queue.filled) == 8
    assert torch.allclose(model.image_queue.features[:8], first_img, atol=1e-6)
    assert torch.allclose(model.text_queue.features[:8], first_txt, atol=1e-6)
    old_target = target.clone()
    opt.step()
    assert not torch.equal(online, target)
    model.momentum_step()
    assert torch.allclose(target, 0.9 * old_target + 0.1 * online, atol=1e-6)
    second_img, _ = momentum_feats()
    assert not torch.allclose(second_img, first_img)
    with torch.no_grad():
        model.pretrain_losses(images, ids, mask, generator=torch.Generator().manual_seed(0))
    q = model.image_queue
    assert int(q.ptr) == 4 and int(q.filled) == 12  # 16 rows written into 12: the pointer wrapped
    assert torch.allclose(q.features[8:12], second_img[:4], atol=1e-6)
    assert torch.allclose(q.features[:4], second_img[4:], atol=1e-6)
    assert torch.allclose(q.features[4:8], first_img[4:], atol=1e-6)  # oldest rows still there
    assert torch.allclose(q.chronological(), torch.cat([first_img[4:], second_img]), atol=1e-6)


def test_albef_save_load_identical(batch, tmp_path):
    images, ids, mask = batch
    model = make("albef-tiny", answers=["yes", "no"])
    train_steps(model, batch, 2)
    model.eval()
    save_model(model, tmp_path / "albef")
    loaded = load_model(tmp_path / "albef").eval()
    assert type(loaded).__name__ == "ALBEF" and loaded.config == model.config
    assert isinstance(loaded.config.special_token_ids, tuple) and loaded.config.answers == ["yes", "no"]
    for name, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[name]), name
    with torch.no_grad():
        for fn in ("itm_scores", "answer_logits"):
            assert torch.equal(getattr(model, fn)(images, ids, mask), getattr(loaded, fn)(images, ids, mask))
        assert torch.equal(model.encode_image(images), loaded.encode_image(images))
        assert torch.equal(model.encode_text(ids, mask), loaded.encode_text(ids, mask))


def test_vilt_shapes_overfit_and_save_load(batch, tmp_path):
    images, ids, mask = batch
    model = make("vilt-tiny", answers=["yes", "no", "maybe", "two"])
    assert not hasattr(model, "encode_image") and not hasattr(model, "encode_text")
    model.eval()
    with torch.no_grad():
        assert model.fuse(images, ids, mask).shape == (8, ids.shape[1] + 16, 64)
        assert model.fused_cls(images, ids, mask).shape == (8, 64)
        assert model.itm_scores(images, ids, mask).shape == (8,)
        assert model.answer_logits(images, ids, mask).shape == (8, 4)
        assert torch.equal(model(images, ids, mask, head="answer"), model.answer_logits(images, ids, mask))
    before = fixed_loss(model.train(), batch)
    train_steps(model, batch, 25)
    after = fixed_loss(model, batch)
    assert after < 0.7 * before, (before, after)
    out = model(images, ids, mask, group_ids=torch.arange(8) // 2)  # default head: the pretraining losses
    assert type(out).__name__ == "ViLTOutput" and torch.allclose(out.loss, out.itm + out.mlm)
    model.eval()
    save_model(model, tmp_path / "vilt")
    loaded = load_model(tmp_path / "vilt").eval()
    assert loaded.config == model.config
    with torch.no_grad():
        assert torch.equal(model.itm_scores(images, ids, mask), loaded.itm_scores(images, ids, mask))
        assert torch.equal(model.answer_logits(images, ids, mask), loaded.answer_logits(images, ids, mask))


def test_named_sizes():
    assert {"albef-tiny", "albef-base", "vilt-tiny", "vilt-base"} <= set(vlkit.list_models())
    from vlkit.models.albef.model import ALBEFConfig
    from vlkit.train.optim import lr_group

    c = ALBEFConfig()
    assert (c.vision_width, c.text_layers, c.fusion_layers, c.vocab_size, c.embed_dim) == (768, 6, 6, 30522, 256)
    assert (c.queue_size, c.momentum, c.distill_alpha) == (65536, 0.995, 0.4)
    model = make("albef-tiny")
    assert lr_group(model, "visual.blocks.0") == "image" and lr_group(model, "fusion.layers.0") == "text"
    assert lr_group(model, "itm_head.fc.weight") == "head"
