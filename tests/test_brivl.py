"""BriVL-style two-tower model on the packaged EfficientNet-Lite0 and all-MiniLM-L6-v2."""

from __future__ import annotations

import pytest
import torch

import vlkit
from vlkit.models.io import load_model, load_tokenizer, save_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return vlkit.create_model("brivl-tiny")


@pytest.fixture(scope="module")
def batch(model):
    tok = load_tokenizer("/nonexistent", model)
    texts = ["a red circle above a blue square", "a dog", "two shapes"]
    return torch.rand(3, 3, 64, 64) * 2 - 1, tok(texts)


def test_forward_shapes_and_frozen_encoders(model, batch):
    images, text = batch
    model.train()
    out = model(images, text["input_ids"], text["attention_mask"])
    assert out.image_embeds.shape == (3, 32) and out.text_embeds.shape == (3, 32)
    assert torch.allclose(out.text_embeds.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert not model.backbone.training and not model.text_backbone.training  # frozen parts stay in eval
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert not any(p.requires_grad for p in model.text_backbone.parameters())
    out.logits_per_image.logsumexp(1).sum().backward()
    assert model.image_head.proj.weight.grad is not None and model.text_head.proj.weight.grad is not None
    assert model.mspp.num_regions == 5  # brivl-tiny pools at scales (1, 2)


def test_padding_does_not_change_text_embedding(model, batch):
    _, text = batch
    model.eval()
    ids, mask = text["input_ids"], text["attention_mask"]
    longer_ids = torch.cat([ids, torch.zeros(3, 4, dtype=ids.dtype)], dim=1)
    longer_mask = torch.cat([mask, torch.zeros(3, 4, dtype=mask.dtype)], dim=1)
    assert torch.allclose(model.encode_text(ids, mask), model.encode_text(longer_ids, longer_mask), atol=1e-5)


def test_default_size_has_37_regions_and_trainable_top_blocks():
    m = vlkit.create_model("brivl-lite0-minilm", trainable_backbone_blocks=2, trainable_text_layers=1)
    assert m.mspp.num_regions == 37
    trainable = {n.split(".")[0] for n, p in m.named_parameters() if p.requires_grad}
    assert {"backbone", "text_backbone", "image_head", "text_head", "logit_scale"} <= trainable
    assert not any(p.requires_grad for p in m.backbone._blocks[0].parameters())
    assert all(p.requires_grad for p in m.backbone._blocks[-1].parameters())
    assert m.train().backbone.training  # trainable blocks: batch norm in training mode


def test_save_load_round_trip(model, batch, tmp_path):
    images, text = batch
    model.eval()
    save_model(model, tmp_path / "b")
    loaded = load_model(tmp_path / "b").eval()
    assert loaded.config == model.config
    assert torch.allclose(loaded.encode_image(images), model.encode_image(images), atol=1e-6)
    assert torch.allclose(loaded.encode_text(text["input_ids"], text["attention_mask"]),
                          model.encode_text(text["input_ids"], text["attention_mask"]), atol=1e-6)
    assert load_tokenizer(tmp_path / "b", loaded) is not None


def test_momentum_heads_and_queues(batch):
    torch.manual_seed(3)
    m = vlkit.create_model("brivl-tiny", momentum=0.9, queue_size=8).train()
    images, text = batch
    out = m(images, text["input_ids"], text["attention_mask"])
    assert out.image_embeds_m.shape == (3, 32) and not out.image_embeds_m.requires_grad
    loss = m.queue(out.image_embeds, out.text_embeds, out.image_embeds_m, out.text_embeds_m).loss
    loss.backward()
    assert m.image_head.proj.weight.grad is not None
    assert int(m.queue.image_queue.filled) == 3  # the batch's momentum features were enqueued
    before = m.momentum_heads["image"].proj.weight.clone()
    with torch.no_grad():
        m.image_head.proj.weight.add_(1.0)
    m.momentum_step()
    expected = 0.9 * before + 0.1 * m.image_head.proj.weight
    assert torch.allclose(m.momentum_heads["image"].proj.weight, expected, atol=1e-6)
