"""VLMo: multiway routing (checked against a slow per-token loop), the three pre-training stages (a tiny model
overfits a batch in each), stage 2's freezing (through a plain optimizer and through the trainer), loading the
weights of one stage into another, save/load, and ``vlkit train`` + ``vlkit eval`` with the stage-3 recipe."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import vlkit
from tests.conftest import run_cli
from vlkit.data.text import build_word_tokenizer
from vlkit.errors import VlkitError
from vlkit.models.io import load_model, save_model
from vlkit.models.vlmo.pretrain import patchify, random_patch_mask, text_groups
from vlkit.models.vlmo.weights import frozen_parameter_names
from vlkit.modules.layers.multiway import MultiwayEncoderLayer, MultiwayMLP

pytestmark = pytest.mark.usefixtures("one_thread")

CAPTIONS = ["a red circle on the left", "a blue square at the top", "a green triangle in the middle",
            "a yellow circle at the bottom", "a red square on the right", "a blue triangle on the left",
            "a green circle at the top", "a yellow square in the middle"]


@pytest.fixture(scope="module")
def batch():
    """8 images (a coloured block at a caption-specific place on a smooth random background) with their
    captions (masked image modelling can predict smooth patches; pixel noise it could only memorise)."""
    g = torch.Generator().manual_seed(0)
    images = F.interpolate(torch.randn(8, 3, 4, 4, generator=g), size=(32, 32), mode="bilinear") * 0.5
    for i in range(8):
        r, c = divmod(i, 4)
        images[i, i % 3, 16 * r: 16 * r + 16, 8 * c: 8 * c + 8] += 2.0
    text = build_word_tokenizer(CAPTIONS, max_length=32)(CAPTIONS)
    return images, text["input_ids"], text["attention_mask"]


def make(**overrides):
    torch.manual_seed(0)
    return vlkit.create_model("vlmo-tiny", **overrides)


# ---------------------------------------------------------------- the multiway layer


def slow_expert(mlp: MultiwayMLP, name: str, token: torch.Tensor) -> torch.Tensor:
    """One token through expert ``name``, written out: LayerNorm, fc1, exact GELU, fc2."""
    norm, m = mlp.norms[name], mlp.mlps[name]
    h = F.layer_norm(token, token.shape, norm.weight, norm.bias, norm.eps)
    return m.fc2.weight @ F.gelu(m.fc1.weight @ h + m.fc1.bias) + m.fc2.bias


def test_multiway_mlp_segments_equal_index_routing_and_a_slow_loop():
    torch.manual_seed(0)
    names = ("vision", "language", "vl")
    mlp = MultiwayMLP(16, 32, names)
    x = torch.randn(3, 7, 16)
    by_segments = mlp(x, segments=[("language", 3), ("vision", 4)])
    index = torch.tensor([1, 1, 1, 0, 0, 0, 0]).expand(3, 7)
    assert torch.allclose(by_segments, mlp(x, expert_index=index), atol=1e-6)
    mixed = torch.randint(0, 3, (3, 7))  # any per-token choice
    for route, out in ((index, by_segments), (mixed, mlp(x, expert_index=mixed))):
        expected = torch.stack([torch.stack([slow_expert(mlp, names[route[b, t]], x[b, t]) for t in range(7)])
                                for b in range(3)])
        assert torch.allclose(out, expected, atol=1e-5)
    with pytest.raises(ValueError, match="one of them"):
        mlp(x)
    with pytest.raises(ValueError, match="do not cover"):
        mlp(x, segments=[("vision", 3)])
    with pytest.raises(KeyError, match="unknown expert"):
        mlp(x, segments=[("audio", 7)])
    layer = MultiwayEncoderLayer(16, 2, names)
    out = layer(x, segments=[("vl", 7)])
    ref = x + layer.attn(layer.ln_1(x))
    assert torch.allclose(out, ref + layer.ffn.expert("vl", ref), atol=1e-6)


# ---------------------------------------------------------------- routing in the model


def reference_fusion(model, images, ids, mask):
    """The fusion pass token by token: modality experts below the top ``fusion_layers``, ``vl`` above."""
    text, image = model.embed_text(ids), model.embed_image(images)
    x = torch.cat([text, image], dim=1)
    pad = torch.cat([mask, torch.ones(image.shape[:2], dtype=mask.dtype)], dim=1)
    c = model.config
    for i, layer in enumerate(model.layers):
        x = x + layer.attn(layer.ln_1(x), key_padding_mask=pad)
        top = i >= c.layers - c.fusion_layers
        names = ["vl" if top else ("language" if t < ids.shape[1] else "vision") for t in range(x.shape[1])]
        x = x + torch.stack([torch.stack([slow_expert(layer.ffn, names[t], x[b, t]) for t in range(x.shape[1])])
                             for b in range(x.shape[0])])
    return model.norm(x)


def test_routing_by_modality_and_fusion_layers(batch):
    images, ids, mask = batch
    images, ids, mask = images[:2], ids[:2], mask[:2]
    model = make(layers=3, fusion_layers=1).eval()
    assert [layer.ffn.names for layer in model.layers] == [("vision", "language")] * 2 + [("vision", "language", "vl")]
    with torch.no_grad():
        assert torch.allclose(model.fuse(images, ids, mask), reference_fusion(model, images, ids, mask), atol=1e-5)
        passes = lambda: (model.image_features(images), model.text_features(ids, mask),  # noqa: E731
                          model.fuse(images, ids, mask))
        base = passes()

        def changed(module) -> tuple[bool, ...]:
            saved = [p.clone() for p in module.parameters()]
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.5)
            out = tuple(not torch.allclose(a, b, atol=1e-6) for a, b in zip(passes(), base))
            for p, s in zip(module.parameters(), saved):
                p.copy_(s)
            return out

        ffn = [layer.ffn.mlps for layer in model.layers]
        # (image-only pass, text-only pass, fusion pass) changed?
        assert changed(ffn[0]["language"]) == (False, True, True)
        assert changed(ffn[1]["vision"]) == (True, False, True)
        assert changed(ffn[2]["language"]) == (False, True, False)  # the top layer fuses with vl only
        assert changed(ffn[2]["vision"]) == (True, False, False)
        assert changed(ffn[2]["vl"]) == (False, False, True)
        assert changed(model.layers[2].attn) == (True, True, True)  # attention is shared


# ---------------------------------------------------------------- the stages


def train_steps(model, batch, steps: int, lr: float = 1e-3) -> None:
    """AdamW on the trainable parameters, the same masks and negatives every step (those of :func:`fixed_loss`)."""
    images, ids, mask = batch
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.1)
    for _ in range(steps):
        out = model.pretrain_losses(images, ids, mask, generator=torch.Generator().manual_seed(7))
        opt.zero_grad()
        out.loss.backward()
        opt.step()


def fixed_loss(model, batch):
    images, ids, mask = batch
    with torch.no_grad():
        return model.pretrain_losses(images, ids, mask, generator=torch.Generator().manual_seed(7))


def test_mim_target_and_mask():
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float).reshape(2, 3, 4, 4)
    patches = patchify(images, 2)  # [2, 4, 12]
    assert patches.shape == (2, 4, 12)
    assert torch.equal(patches[1, 1].reshape(2, 2, 3), images[1, :, 0:2, 2:4].permute(1, 2, 0))  # patch (0, 1)
    m = random_patch_mask(5, 16, 0.4, torch.Generator().manual_seed(0))
    assert m.shape == (5, 16) and (m.sum(dim=1) == 6).all()


def test_identical_captions_form_a_group(batch):
    images, ids, mask = batch
    ids, mask = ids.clone(), mask.clone()
    ids[5], mask[5] = ids[2], mask[2]  # image 5 gets image 2's caption
    ids[7, mask[7] == 0] = 9  # a different token under the padding changes nothing
    ids[6], mask[6] = ids[7], mask[7]
    groups = text_groups(ids, mask)
    keys = [tuple(row[m.bool()].tolist()) for row, m in zip(ids, mask)]  # the texts themselves
    assert all((groups[i] == groups[j]) == (keys[i] == keys[j]) for i in range(8) for j in range(8))
    assert groups[2] == groups[5] and groups[6] == groups[7] and len(set(groups.tolist())) == 6
    model = make()
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    derived = model.pretrain_losses(images, ids, mask, generator=g())
    explicit = model.pretrain_losses(images, ids, mask, group_ids=groups, generator=g())
    assert torch.equal(derived.loss, explicit.loss)
    assert not torch.equal(derived.loss, model.pretrain_losses(images, ids, mask, group_ids=torch.arange(8),
                                                               generator=g()).loss)


@pytest.mark.parametrize("stage, fields, steps", [("image", ("mim",), 40), ("text", ("mlm",), 30),
                                                  ("image_text", ("itc", "itm", "mlm"), 60)])
def test_each_stage_overfits_a_batch(batch, stage, fields, steps):
    model = make(stage=stage)
    before = fixed_loss(model.train(), batch)
    assert before.loss.requires_grad is False
    assert {f for f in ("itc", "itm", "mlm", "mim") if getattr(before, f) is not None} == set(fields)
    assert torch.allclose(before.loss, sum(getattr(before, f) for f in fields))
    train_steps(model, batch, steps)
    after = fixed_loss(model, batch)
    assert after.loss < 0.6 * before.loss, (stage, before, after)
    if stage == "image_text":
        # ITM first learns the share of negatives (2 of 3 pairs), then (after ~80 steps) the pairs themselves
        assert after.itc < 0.2 * before.itc and after.mlm < 0.6 * before.mlm and after.itm < 0.8 * before.itm


def test_text_stage_freezes_attention_and_the_vision_side(batch):
    images, ids, mask = batch
    model = make(stage="text")
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == set(frozen_parameter_names(model))
    assert {"layers.0.attn.in_proj.weight", "layers.1.attn.out_proj.bias", "layers.1.ln_1.weight",
            "layers.1.ffn.mlps.vision.fc1.weight", "layers.0.ffn.norms.vision.bias", "patch_embed.proj.weight",
            "cls_token", "image_pos_embed", "image_type_embed", "norm.weight"} <= frozen
    assert not any("language" in n or n.startswith("text_embed.") for n in frozen)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        image_pass = model.image_features(images)
    train_steps(model, batch, 3)
    after = dict(model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in frozen)
    language = "layers.0.ffn.mlps.language.fc1.weight"
    assert not torch.equal(before[language], after[language])
    with torch.no_grad():
        assert torch.equal(model.image_features(images), image_pass)  # the image-only pass is untouched
    assert all(p.requires_grad for p in make(stage="image_text").parameters())


# ---------------------------------------------------------------- heads, saving, loading across stages


def test_heads_matching_and_errors(batch):
    images, ids, mask = batch
    model = make(answers=["yes", "no", "red"]).eval()
    with torch.no_grad():
        out = model(images, ids, mask)
        assert out.image_embeds.shape == (8, 32) and torch.allclose(out.text_embeds.norm(dim=-1), torch.ones(8))
        assert torch.allclose(model.encode_text(ids), out.text_embeds, atol=1e-6)  # mask from the pad id
        scores = model(images, ids, mask, head="itm")
        assert scores.shape == (8,) and ((scores > 0) & (scores < 1)).all()
        feats = model.match_features(images)
        assert feats.shape == (8, 17, 64)
        assert torch.allclose(model.match_scores(feats, ids, mask), scores, atol=1e-6)
        rows = torch.tensor([5, 2, 2])  # rows are independent of the rest of the batch
        assert torch.allclose(model.match_scores(feats[rows], ids[rows], mask[rows]), scores[rows], atol=1e-5)
        assert model(images, ids, mask, head="answer").shape == (8, 3)
        assert model(images, ids, mask, head="cls").shape == (8, 64)
        assert model.fuse(images, ids, mask).shape == (8, ids.shape[1] + 17, 64)
        with pytest.raises(VlkitError, match="unknown VLMo head"):
            model(images, ids, mask, head="nope")
    with pytest.raises(VlkitError, match="no answer head"):
        make().answer_logits(images, ids, mask)
    with pytest.raises(VlkitError, match="stage"):
        make(stage="video")
    with pytest.raises(VlkitError, match="fusion_layers"):
        make(fusion_layers=3)
    from vlkit.inference.matching import can_match

    assert can_match(model) and {"vlmo-tiny", "vlmo-base"} <= set(vlkit.list_models("vlmo*"))


def test_grad_checkpointing_gives_the_same_loss_and_gradients(batch):
    images, ids, mask = batch
    model = make(dropout=0.0).train()
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        out = model.pretrain_losses(images, ids, mask, generator=torch.Generator().manual_seed(0))
        out.loss.backward()
        grads.append((out.loss.detach(), [p.grad.clone() for p in model.layers.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-6) and len(grads[0][1]) == len(grads[1][1]) > 0
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads[0][1], grads[1][1]))


def test_base_size():
    with torch.device("meta"):
        model = vlkit.create_model("vlmo-base")
    c = model.config
    assert (c.width, c.layers, c.heads, c.fusion_layers, c.image_size, c.patch_size, c.vocab_size,
            c.context_length) == (768, 12, 12, 2, 224, 16, 30522, 40)
    assert sum("vl" in layer.ffn.names for layer in model.layers) == 2
    assert 170e6 < sum(p.numel() for p in model.parameters()) < 185e6  # the paper's VLMo-Base: 175M


def test_save_load_and_loading_another_stage(batch, tmp_path):
    images, ids, mask = batch
    model = make(stage="image", vocab_size=50, context_length=16).eval()
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m").eval()
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), model.encode_image(images))
        assert torch.equal(loaded.itm_scores(images, ids, mask), model.itm_scores(images, ids, mask))
        assert torch.equal(loaded.pretrain_losses(images, ids, mask, generator=g()).loss,
                           model.pretrain_losses(images, ids, mask, generator=g()).loss)
    # a text-stage model with a VQA head from the image-stage weights: the saved vocabulary and sizes win
    torch.manual_seed(1)
    other = vlkit.create_model("vlmo-tiny", tmp_path / "m", stage="text", answers=["yes", "no"]).eval()
    assert (other.config.vocab_size, other.config.context_length, other.config.stage) == (50, 16, "text")
    assert not other.layers[0].attn.in_proj.weight.requires_grad and other.text_type_embed.requires_grad
    with torch.no_grad():
        assert torch.equal(other.text_features(ids, mask), model.text_features(ids, mask))
        assert other.answer_logits(images, ids, mask).shape == (8, 2)
    with pytest.raises(VlkitError, match="not a VLMo"):
        save_model(vlkit.create_model("vilt-tiny"), tmp_path / "v")
        vlkit.create_model("vlmo-tiny", tmp_path / "v")


# ---------------------------------------------------------------- the recipes through the trainer and the CLI


@pytest.fixture(scope="module")
def stage3_run(synth, tmp_path_factory):
    run = tmp_path_factory.mktemp("vlmo") / "stage3"
    proc = run_cli("train", "vlmo_synth_stage3_image_text", f"datasets.synth.path={synth}", "model.pretrained=null",
                   f"output_dir={run}", "max_steps=4", "batch_size=16", "progress=false", "tensorboard=false",
                   "log_every=1", "eval_every=4", "save_every=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def test_stage3_recipe_trains_and_eval_retrieval_runs(stage3_run, synth):
    rows = [json.loads(line) for line in (stage3_run / "metrics.jsonl").read_text().splitlines()]
    logged = set().union(*rows)
    assert {"train/synth/itc", "train/synth/itm", "train/synth/mlm", "train/synth/itm_accuracy",
            "val/synth/t2i_r1", "val/synth/itm_acc"} <= logged
    # retrieval by the contrastive embeddings, each query's top 3 re-ranked by the ITM head (match_features/scores)
    proc = run_cli("eval", stage3_run, "--data", synth, "--split", "val", "--rerank", "3", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    metrics = out["metrics"]
    assert out["rerank"] == 3 and out["rerank_pairs"] > 0 and 0 <= metrics["val/synth/t2i_r1"] <= 100
    for name in ("t2i_r5", "t2i_r10", "i2t_r5", "i2t_r10"):  # re-ordering within the top 3 leaves these as they were
        assert metrics[f"val/synth/{name}"] == metrics[f"val/synth/{name}_itc"]


def test_stage2_recipe_from_a_saved_model_freezes_through_the_trainer(stage3_run, synth, tmp_path):
    from safetensors.torch import load_file

    from vlkit.config.load import load_config
    from vlkit.config.recipes import recipe_path
    from vlkit.train.trainer import Trainer

    run = tmp_path / "stage2"
    cfg = load_config(recipe_path("vlmo_synth_stage2_text"), [
        f"datasets.synth.path={synth}", f"model.pretrained={stage3_run / 'model'}", f"output_dir={run}",
        "max_steps=3", "batch_size=32", "progress=false", "tensorboard=false", "datasets.synth.val_split=null"])
    Trainer(cfg).run()
    before = load_file(stage3_run / "model" / "model.safetensors")
    after = load_file(run / "model" / "model.safetensors")
    model = load_model(run / "model")
    assert model.config.stage == "text"
    frozen = set(frozen_parameter_names(model))
    assert frozen and all(torch.equal(before[n], after[n]) for n in frozen)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert any(".ffn.mlps.language." in n for n in changed) and changed.isdisjoint(frozen)
    assert (run / "model" / "tokenizer.json").read_text() == (stage3_run / "model" / "tokenizer.json").read_text()
