"""CLIP: shapes, pooling, registry, save/load, other image sizes."""

from __future__ import annotations

import pytest
import torch

import vlkit
from vlkit.errors import VlkitError
from vlkit.models.io import load_model, save_model


def test_registry_lists_and_builds():
    names = vlkit.list_models("clip-*")
    assert {"clip-tiny", "clip-vit-b-32", "clip-vit-b-16", "clip-vit-l-14"} <= set(names)
    with pytest.raises(VlkitError, match="unknown model 'clip-huge'"):
        vlkit.create_model("clip-huge")
    b32 = vlkit.create_model("clip-vit-b-32")
    n_params = sum(p.numel() for p in b32.parameters())
    assert 150e6 < n_params < 153e6  # OpenAI ViT-B/32 has 151.3M parameters


def test_tiny_clip_encodes_and_is_normalised():
    torch.manual_seed(0)
    model = vlkit.create_model("clip-tiny").eval()
    images = torch.randn(3, 3, 32, 32)
    ids = torch.randint(1, 998, (2, 10))
    ids[:, 6] = 999  # highest id = end of text (argmax pooling)
    ids[:, 7:] = 0
    out = model(images[:2], ids)
    assert out.image_embeds.shape == (2, 32) and out.text_embeds.shape == (2, 32)
    assert torch.allclose(out.image_embeds.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(out.logits_per_image, out.logit_scale * out.image_embeds @ out.text_embeds.T)
    # tokens after the end-of-text token cannot change the text embedding (causal attention)
    ids2 = ids.clone()
    ids2[:, 7:] = 5
    assert torch.allclose(model.encode_text(ids2), out.text_embeds, atol=1e-6)
    # another image size works by resampling the position grid
    assert model.encode_image(torch.randn(1, 3, 48, 48)).shape == (1, 32)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(1)
    model = vlkit.create_model("clip-tiny", eos_token_id=3).eval()
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m").eval()
    assert loaded.config == model.config
    images, ids = torch.randn(2, 3, 32, 32), torch.tensor([[2, 7, 8, 3, 0], [2, 9, 3, 0, 0]])
    assert torch.equal(loaded.encode_image(images), model.encode_image(images))
    assert torch.equal(loaded.encode_text(ids), model.encode_text(ids))
    other = vlkit.create_model("clip-tiny", vision_layers=3)
    with pytest.raises(VlkitError, match="unexpected keys|missing keys"):
        from vlkit.models.io import load_state_into

        load_state_into(other, tmp_path / "m")


def test_grad_checkpointing_same_gradients():
    torch.manual_seed(2)
    model = vlkit.create_model("clip-tiny").train()
    images, ids = torch.randn(2, 3, 32, 32), torch.randint(1, 999, (2, 8))

    def grads():
        model.zero_grad()
        out = model(images, ids)
        out.logits_per_image.logsumexp(dim=1).sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.set_grad_checkpointing(True)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, grads()))


def test_pooled_fast_paths_equal_the_full_computation():
    torch.manual_seed(4)
    model = vlkit.create_model("clip-tiny").eval()
    images = torch.randn(2, 3, 32, 32)
    tokens = model.visual.forward_features(images)
    assert torch.allclose(model.visual(images), model.visual.pool(tokens), atol=1e-5)
    ids = torch.randint(1, 998, (2, 12))
    ids[0, 4], ids[1, 7] = 999, 999
    ids[0, 5:], ids[1, 8:] = 0, 0
    full = model.text.pool(model.text.forward_features(ids), ids)
    assert torch.allclose(model.text(ids), full, atol=1e-5)
