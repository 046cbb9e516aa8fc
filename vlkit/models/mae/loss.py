"""The MAE reconstruction loss: mean squared error on (per-patch normalised) pixels of the masked patches only."""

from __future__ import annotations

import torch
from torch import Tensor


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """Images ``[batch, C, H, W]`` to patch pixels ``[batch, (H/p)*(W/p), p*p*C]`` (row-major patches, each
    patch row-major with channels last)."""
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: Tensor, patch_size: int, height: int, width: int, channels: int = 3) -> Tensor:
    """The inverse of :func:`patchify`: ``[batch, patches, p*p*C]`` to ``[batch, C, H, W]``."""
    b = patches.shape[0]
    p = patch_size
    x = patches.reshape(b, height // p, width // p, p, p, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, height, width)


def normalized_targets(target: Tensor, eps: float = 1e-6) -> Tensor:
    """Each patch's pixels minus their mean, over their standard deviation (``norm_pix_loss``)."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True, unbiased=True)
    return (target - mean) / (var + eps).sqrt()


def mae_loss(pred: Tensor, target: Tensor, mask: Tensor, norm_pix: bool = True) -> Tensor:
    """Mean over masked patches of the per-patch mean squared error.

    Args:
        pred: predicted pixels ``[batch, patches, p*p*C]``.
        target: true pixels, the same shape (from :func:`patchify`).
        mask: ``[batch, patches]``, 1 for a masked patch (the only ones the loss counts), 0 for a visible one.
        norm_pix: compare with per-patch normalised targets (:func:`normalized_targets`).

    Returns:
        The scalar loss.
    """
    if norm_pix:
        target = normalized_targets(target)
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)  # [batch, patches]
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)
