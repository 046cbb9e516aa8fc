"""LiT: locking a tower, unlocking its last blocks."""

from __future__ import annotations

import pytest
import torch

import vlkit
from vlkit.errors import VlkitError
from vlkit.models.lit import lock_tower


def test_lock_image_tower_with_last_block_unlocked():
    model = lock_tower(vlkit.create_model("clip-tiny"), "image", unlocked_blocks=1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("visual.transformer.layers.0.") for n in trainable)
    assert any(n.startswith("visual.transformer.layers.1.") for n in trainable)
    assert "visual_projection.weight" not in trainable and "visual.patch_embed.proj.weight" not in trainable
    assert any(n.startswith("text.") for n in trainable) and "logit_scale" in trainable
    model.train()
    assert not model.visual.patch_embed.training and model.text.training
    before = model.visual.patch_embed.proj.weight.clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    out = model(torch.randn(2, 3, 32, 32), torch.randint(1, 999, (2, 6)))
    out.logits_per_image.logsumexp(1).sum().backward()
    opt.step()
    assert torch.equal(model.visual.patch_embed.proj.weight, before)


def test_lock_text_tower_and_errors():
    model = lock_tower(vlkit.create_model("clip-tiny"), "text", unlock_projection=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "text_projection.weight" in trainable and not any(n.startswith("text.") for n in trainable)
    with pytest.raises(VlkitError, match="tower must be"):
        lock_tower(vlkit.create_model("clip-tiny"), "audio")
    with pytest.raises(VlkitError, match="cannot unlock 5 blocks"):
        lock_tower(vlkit.create_model("clip-tiny"), "image", unlocked_blocks=5)
