"""Stochastic depth (Huang et al. 2016): drop a whole residual branch per sample while training."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class DropPath(nn.Module):
    """Zeroes a residual branch for a random ``rate`` share of the samples, rescaling the others by
    ``1 / (1 - rate)``; the identity in eval mode or at rate 0.

    Args:
        rate: probability of dropping a sample's branch, in ``[0, 1)``.
    """

    def __init__(self, rate: float = 0.0):
        super().__init__()
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"drop path rate must be in [0, 1), got {rate}")
        self.rate = rate

    def forward(self, x: Tensor) -> Tensor:
        """``[batch, ...]`` -> the same shape."""
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"rate={self.rate}"
