"""Random patch masking for masked image modelling (MAE, BEiT-style): a random subset of patches per image."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class PatchMask:
    """Which patches of each image are kept (visible) and which are masked.

    Attributes:
        keep: indices of the visible patches ``[batch, keep]``, in the order they are fed to an encoder.
        mask: ``[batch, patches]`` with 1.0 where a patch is masked and 0.0 where it is visible (original order).
        restore: ``[batch, patches]``; ``shuffled.gather(1, restore)`` puts tokens laid out as
            ``[visible..., masked...]`` back in the original patch order.
    """

    keep: Tensor
    mask: Tensor
    restore: Tensor

    @property
    def num_keep(self) -> int:
        return self.keep.shape[1]


def num_visible(num_patches: int, ratio: float) -> int:
    """Number of patches left visible when ``ratio`` of ``num_patches`` is masked (at least one)."""
    return max(1, int(num_patches * (1.0 - ratio)))


def random_patch_mask(
    batch: int,
    num_patches: int,
    ratio: float = 0.75,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> PatchMask:
    """Draws an independent random mask for each image; exactly the same number of patches masked in each.

    Args:
        batch: number of images.
        num_patches: patches per image.
        ratio: share of patches masked, in ``[0, 1)``.
        generator: the random source (seeded for reproducible masks); the global one when ``None``.
        device: where the indices live (the generator's device when a generator is given).

    Returns:
        The :class:`PatchMask`.

    Raises:
        ValueError: when ``ratio`` is outside ``[0, 1)`` or ``num_patches`` is not positive.

    Example:
        >>> m = random_patch_mask(2, 16, 0.75, torch.Generator().manual_seed(0))
        >>> m.keep.shape, int(m.mask.sum())
        (torch.Size([2, 4]), 24)
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    if num_patches < 1:
        raise ValueError(f"num_patches must be positive, got {num_patches}")
    if generator is not None:
        device = generator.device
    noise = torch.rand(batch, num_patches, generator=generator, device=device)  # [batch, patches]
    shuffle = noise.argsort(dim=1)  # patch ids, visible ones first
    restore = shuffle.argsort(dim=1)  # position of each patch in the shuffled order
    n_keep = num_visible(num_patches, ratio)
    keep = shuffle[:, :n_keep]  # [batch, keep]
    mask = torch.ones(batch, num_patches, device=noise.device)
    mask[:, :n_keep] = 0.0
    mask = mask.gather(1, restore)  # back to the original patch order
    return PatchMask(keep=keep, mask=mask, restore=restore)


def gather_patches(tokens: Tensor, index: Tensor) -> Tensor:
    """Selects tokens ``[batch, n, dim]`` at ``index`` ``[batch, k]`` -> ``[batch, k, dim]``."""
    return tokens.gather(1, index[..., None].expand(-1, -1, tokens.shape[-1]))
