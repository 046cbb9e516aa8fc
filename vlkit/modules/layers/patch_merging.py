"""Patch merging (Swin): halve a token map's sides and double its width."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PatchMerging(nn.Module):
    """Concatenates each 2x2 neighbourhood of tokens (4C), normalises and projects to ``out_dim`` (2C).

    A map with an odd side is padded with zeros on the bottom or right first.

    Args:
        dim: input token width C.
        out_dim: output width (default 2C).
        norm_eps: LayerNorm epsilon.
    """

    def __init__(self, dim: int, out_dim: int | None = None, norm_eps: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim, eps=norm_eps)
        self.reduction = nn.Linear(4 * dim, out_dim or 2 * dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """``[batch, H, W, C]`` -> ``[batch, ceil(H/2), ceil(W/2), out_dim]``."""
        h, w = x.shape[1], x.shape[2]
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        # order of the 2x2 neighbours: (0,0), (1,0), (0,1), (1,1) as (row, column)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))
