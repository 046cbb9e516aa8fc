"""Window attention with a relative position bias, and the shifted-window block of Swin (Liu et al. 2021).

Tokens on a ``[batch, H, W, C]`` map attend only within square windows of ``window`` x ``window`` tokens,
so the cost grows linearly with the number of pixels instead of quadratically. Every second block shifts
the window grid by ``shift`` tokens (a cyclic roll of the map); the attention mask keeps tokens that the roll
brought together from different windows of the shifted grid apart. Maps whose sides are not multiples of
the window are padded on the bottom and right, and the padding is masked out of every real token's keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlkit.modules.layers.drop_path import DropPath
from vlkit.modules.layers.mlp import MLP


def window_partition(x: Tensor, window: int) -> Tensor:
    """``[batch, H, W, C]`` (sides multiples of ``window``) -> ``[batch, windows, window*window, C]``,
    windows row by row."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).transpose(2, 3).contiguous()
    return x.view(b, (h // window) * (w // window), window * window, c)


def window_reverse(windows: Tensor, window: int, height: int, width: int) -> Tensor:
    """Inverse of :func:`window_partition`: ``[batch, windows, window*window, C]`` -> ``[batch, H, W, C]``."""
    b, _, _, c = windows.shape
    x = windows.view(b, height // window, width // window, window, window, c).transpose(2, 3).contiguous()
    return x.view(b, height, width, c)


def relative_position_index(window: int) -> Tensor:
    """``[window*window, window*window]`` index into a ``(2*window - 1)**2`` bias table: the entry of the
    offset (dy, dx) between query and key tokens of a window."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()])  # [2, N]
    rel = coords[:, :, None] - coords[:, None, :] + (window - 1)  # [2, N, N], each in [0, 2w-2]
    return rel[0] * (2 * window - 1) + rel[1]


def shifted_window_mask(height: int, width: int, window: int, shift: int, valid_height: int, valid_width: int,
                        device: torch.device | None = None) -> Tensor:
    """Which keys each query may attend to, per window of the rolled, padded map: ``[windows, N, N]``
    booleans (True = attend), ``N = window*window``.

    A token at (y, x) of the map belongs to window ``((y - shift) // window, (x - shift) // window)`` of the
    shifted grid; after the roll by ``-shift`` two tokens of one window may attend each other only when they
    belong to the same shifted-grid window. Padding (``y >= valid_height`` or ``x >= valid_width``) is never
    a key of a real token; a padding query attends to the padding of its window (its output is discarded).

    Args:
        height, width: padded map sides (multiples of ``window``).
        window: window side.
        shift: roll of the grid (0 for unshifted windows).
        valid_height, valid_width: the real map's sides before padding.
    """
    ys = torch.arange(height, device=device)
    xs = torch.arange(width, device=device)
    label = ((ys - shift).div(window, rounding_mode="floor")[:, None] * (width + 1)
             + (xs - shift).div(window, rounding_mode="floor")[None, :])  # [H, W]
    real = (ys < valid_height)[:, None] & (xs < valid_width)[None, :]  # [H, W]
    grid = torch.stack([label, real.long()], dim=-1)[None]  # [1, H, W, 2]
    if shift:
        grid = torch.roll(grid, shifts=(-shift, -shift), dims=(1, 2))
    grid = window_partition(grid, window)[0]  # [windows, N, 2]
    label, real = grid[..., 0], grid[..., 1].bool()
    same = label[:, :, None] == label[:, None, :]  # [windows, N(query), N(key)]
    return same & (real[:, None, :] | ~real[:, :, None])


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, with a learned bias per head and relative offset.

    Args:
        dim: token width.
        num_heads: attention heads; ``dim`` must divide evenly.
        window: window side in tokens.
        qkv_bias: biases on the query/key/value projection.
        dropout: attention dropout (training only).
    """

    def __init__(self, dim: int, num_heads: int, window: int, qkv_bias: bool = True, dropout: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads, self.head_dim, self.window, self.dropout = num_heads, dim // num_heads, window, dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)

    def relative_position_bias(self) -> Tensor:
        """``[heads, N, N]``: the bias added to the attention logits of every window."""
        n = self.window * self.window
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]  # [N*N, heads]
        return bias.view(n, n, self.num_heads).permute(2, 0, 1)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Attend within each window.

        Args:
            x: ``[batch, windows, N, dim]`` with ``N = window*window``.
            mask: ``[windows, N, N]`` booleans (True = attend), e.g. from :func:`shifted_window_mask`.

        Returns:
            ``[batch, windows, N, dim]``.
        """
        b, nw, n, d = x.shape
        qkv = self.qkv(x).view(b, nw, n, 3, self.num_heads, self.head_dim).permute(3, 0, 1, 4, 2, 5)
        q, k, v = qkv.unbind(0)  # each [batch, windows, heads, N, head_dim]
        bias = self.relative_position_bias().to(q.dtype)  # [heads, N, N]
        if mask is not None:
            bias = bias.masked_fill(~mask[:, None], float("-inf"))  # [windows, heads, N, N]
        bias = bias.expand(b, nw, self.num_heads, n, n).reshape(b * nw, self.num_heads, n, n)
        shape = (b * nw, self.num_heads, n, self.head_dim)
        out = F.scaled_dot_product_attention(q.reshape(shape), k.reshape(shape), v.reshape(shape), attn_mask=bias,
                                             dropout_p=self.dropout if self.training else 0.0)
        out = torch.cat(out.unbind(1), dim=-1).view(b, nw, n, d)  # heads side by side: [batch, windows, N, dim]
        return self.proj(out)


class SwinBlock(nn.Module):
    """x + attn(norm1(x)) over (shifted) windows; x + mlp(norm2(x)). Works on ``[batch, H, W, C]`` maps.

    The shift is skipped on a map that fits in one window (one window already sees every token).

    Args:
        dim: token width.
        num_heads: attention heads.
        window: window side in tokens.
        shift: roll of the window grid (``window // 2`` on every second block of Swin, else 0).
        mlp_ratio: MLP hidden width / dim.
        act: MLP activation.
        norm_eps: LayerNorm epsilon.
        drop_path: stochastic-depth rate of both residual branches.
        qkv_bias: biases on the query/key/value projection.
    """

    def __init__(self, dim: int, num_heads: int, window: int, shift: int = 0, mlp_ratio: float = 4.0,
                 act: str = "gelu", norm_eps: float = 1e-5, drop_path: float = 0.0, qkv_bias: bool = True):
        super().__init__()
        if not 0 <= shift < window:
            raise ValueError(f"shift must be in [0, {window}), got {shift}")
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = WindowAttention(dim, num_heads, window, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio), act)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        """``[batch, H, W, C]`` -> ``[batch, H, W, C]``; any H and W."""
        b, h, w, c = x.shape
        ws = self.window
        shift = self.shift if (h > ws or w > ws) else 0
        y = self.norm1(x)
        pad_b, pad_r = (-h) % ws, (-w) % ws
        if pad_b or pad_r:
            y = F.pad(y, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = h + pad_b, w + pad_r
        if shift:
            y = torch.roll(y, shifts=(-shift, -shift), dims=(1, 2))
        mask = None
        if shift or pad_b or pad_r:
            mask = shifted_window_mask(hp, wp, ws, shift, h, w, device=x.device)
        y = window_reverse(self.attn(window_partition(y, ws), mask), ws, hp, wp)  # [batch, Hp, Wp, C]
        if shift:
            y = torch.roll(y, shifts=(shift, shift), dims=(1, 2))
        x = x + self.drop_path(y[:, :h, :w])
        return x + self.drop_path(self.mlp(self.norm2(x)))
