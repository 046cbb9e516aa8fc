"""MAE: patch masking, an encoder that sees only visible patches, the masked-pixel loss, training and
fine-tuning from a pretrained encoder."""

from __future__ import annotations

import pytest
import torch

from vlkit.modules.layers.masking import gather_patches, random_patch_mask

pytestmark = pytest.mark.usefixtures("one_thread")


def test_masking_counts_differ_per_image_and_restore_order():
    m = random_patch_mask(8, 64, 0.75, torch.Generator().manual_seed(0))
    assert m.keep.shape == (8, 16)
    assert m.mask.sum(dim=1).tolist() == [48.0] * 8  # exactly 75% masked in every image
    # the kept patches are exactly the unmasked ones
    for b in range(8):
        visible = set(torch.nonzero(m.mask[b] == 0).flatten().tolist())
        assert set(m.keep[b].tolist()) == visible
    assert len({tuple(sorted(k.tolist())) for k in m.keep}) == 8  # a different mask per image
    # restore: [visible..., masked...] laid out by the shuffle goes back to the original order
    tokens = torch.arange(64).float()[None, :, None].expand(8, 64, 2)
    shuffled = gather_patches(tokens, m.restore.argsort(dim=1))
    assert torch.equal(shuffled[:, :16], gather_patches(tokens, m.keep))
    assert torch.equal(gather_patches(shuffled, m.restore), tokens)
    # seeded: the same generator seed gives the same masks, another ratio another count
    again = random_patch_mask(8, 64, 0.75, torch.Generator().manual_seed(0))
    assert torch.equal(again.keep, m.keep)
    assert random_patch_mask(2, 64, 0.5, torch.Generator().manual_seed(0)).keep.shape == (2, 32)
    with pytest.raises(ValueError):
        random_patch_mask(2, 64, 1.0)
