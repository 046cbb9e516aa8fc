"""Patch dropout (FLIP, Li et al. 2023): train on a random subset of the image tokens."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class PatchDropout(nn.Module):
    """Keeps a random ``1 - prob`` share of the patch tokens of each image while training.

    Args:
        prob: share of patch tokens dropped (0 disables).
        num_prefix: leading tokens (class token) that are always kept.
    """

    def __init__(self, prob: float = 0.0, num_prefix: int = 1):
        super().__init__()
        if not 0.0 <= prob < 1.0:
            raise ValueError(f"patch dropout probability must be in [0, 1), got {prob}")
        self.prob, self.num_prefix = prob, num_prefix

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.prob == 0.0:
            return x
        prefix, patches = x[:, : self.num_prefix], x[:, self.num_prefix :]
        b, n, d = patches.shape
        keep = max(1, int(n * (1.0 - self.prob)))
        idx = torch.rand(b, n, device=x.device).argsort(dim=1)[:, :keep]  # [batch, keep]
        patches = patches.gather(1, idx[..., None].expand(b, keep, d))
        return torch.cat([prefix, patches], dim=1)  # [batch, prefix + keep, dim]
