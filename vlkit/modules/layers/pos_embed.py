"""Position embeddings: sinusoidal (1-D and 2-D) and resampling of learned 2-D grids to other sizes."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def sinusoidal_1d(length: int, dim: int, base: float = 10000.0) -> Tensor:
    """Fixed sine/cosine embeddings ``[length, dim]`` (Vaswani et al. 2017); ``dim`` must be even."""
    if dim % 2:
        raise ValueError(f"sinusoidal embeddings need an even width, got {dim}")
    pos = torch.arange(length, dtype=torch.float64)[:, None]
    freq = torch.exp(-math.log(base) * torch.arange(0, dim, 2, dtype=torch.float64) / dim)[None]
    out = torch.zeros(length, dim, dtype=torch.float64)
    out[:, 0::2] = torch.sin(pos * freq)
    out[:, 1::2] = torch.cos(pos * freq)
    return out.float()


def sinusoidal_2d(height: int, width: int, dim: int, base: float = 10000.0) -> Tensor:
    """2-D sine/cosine embeddings ``[height * width, dim]``: half the width encodes rows, half columns."""
    if dim % 4:
        raise ValueError(f"2-D sinusoidal embeddings need a width divisible by 4, got {dim}")
    rows = sinusoidal_1d(height, dim // 2, base)  # [H, dim/2]
    cols = sinusoidal_1d(width, dim // 2, base)  # [W, dim/2]
    grid = torch.cat([rows[:, None].expand(height, width, -1), cols[None].expand(height, width, -1)], dim=-1)
    return grid.reshape(height * width, dim)


def resample_grid(pos_embed: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int], num_prefix: int = 1,
                  mode: str = "bicubic") -> Tensor:
    """Interpolate a learned grid of position embeddings to another grid size (another image size).

    Args:
        pos_embed: ``[num_prefix + H*W, dim]`` (prefix tokens such as the class token come first and are kept).
        old_grid: ``(H, W)`` of ``pos_embed``.
        new_grid: target ``(H', W')``.
        num_prefix: tokens before the grid.
        mode: interpolation mode of ``F.interpolate``.

    Returns:
        ``[num_prefix + H'*W', dim]``.
    """
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    prefix, grid = pos_embed[:num_prefix], pos_embed[num_prefix:]
    dim = grid.shape[-1]
    if grid.shape[0] != old_grid[0] * old_grid[1]:
        raise ValueError(f"{grid.shape[0]} grid positions do not form a {old_grid[0]}x{old_grid[1]} grid")
    grid = grid.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2).float()  # [1, dim, H, W]
    grid = F.interpolate(grid, size=tuple(new_grid), mode=mode, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=0)
