"""Space-time attention blocks of TimeSformer (Bertasius et al. 2021): divided, joint and space-only.

Token layouts (``frames`` T, ``patches`` N per frame, patch tokens frame-major: frame 0's N patches, then frame
1's, ...):

- ``divided`` and ``joint``: ``[batch, 1 + T*N, dim]``, one class token for the whole clip first.
- ``space``: ``[batch*T, 1 + N, dim]``, one class token per frame; frames never meet inside the blocks.

A divided block (as the paper's code does it): temporal attention among the T tokens at one patch position
(the class token takes no part), its output through ``temporal_fc`` added to the patch tokens; then spatial
attention within each frame, where every frame gets a copy of the class token and the T class outputs are
averaged; then the MLP. ``temporal_fc`` starts at zero, so a freshly built block leaves the patch tokens to the
spatial part, which is an image block run on each frame.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .attention import MultiHeadAttention
from .mlp import MLP

ATTENTIONS = ("divided", "joint", "space")


class SpaceTimeBlock(nn.Module):
    """One pre-norm TimeSformer block; ``ln_1``/``attn``/``ln_2``/``mlp`` are named as in
    :class:`~vlkit.modules.layers.transformer.TransformerEncoderLayer`, so an image block's weights load by name.

    Args:
        dim: width.
        num_heads: attention heads.
        attention: ``divided`` (temporal then spatial), ``joint`` (all tokens of the clip) or ``space`` (each
            frame alone).
        mlp_ratio: MLP hidden width / dim.
        act: MLP activation.
        norm_eps: LayerNorm epsilon.
    """

    def __init__(self, dim: int, num_heads: int, attention: str = "divided", mlp_ratio: float = 4.0,
                 act: str = "gelu", norm_eps: float = 1e-5):
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        self.attention = attention
        if attention == "divided":
            self.temporal_ln = nn.LayerNorm(dim, eps=norm_eps)
            self.temporal_attn = MultiHeadAttention(dim, num_heads)
            self.temporal_fc = nn.Linear(dim, dim)
            nn.init.zeros_(self.temporal_fc.weight)
            nn.init.zeros_(self.temporal_fc.bias)
        self.ln_1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = MultiHeadAttention(dim, num_heads)
        self.ln_2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio), act)

    def forward(self, x: Tensor, frames: int) -> Tensor:
        """Apply the block.

        Args:
            x: ``[batch, 1 + frames*patches, dim]`` (divided, joint) or ``[batch*frames, 1 + patches, dim]``
                (space); see the module docstring.
            frames: T.

        Returns:
            The same shape as ``x``.
        """
        if self.attention == "divided":
            x = self._divided(x, frames)
        else:
            x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))

    def _divided(self, x: Tensor, frames: int) -> Tensor:
        b, n_tok, d = x.shape
        n = (n_tok - 1) // frames
        if 1 + frames * n != n_tok:
            raise ValueError(f"{n_tok - 1} patch tokens do not split into {frames} frames")
        cls, patches = x[:, :1], x[:, 1:]  # [b, 1, d], [b, T*N, d]
        # temporal: the T tokens at each patch position attend to each other
        xt = patches.reshape(b, frames, n, d).transpose(1, 2).reshape(b * n, frames, d)  # [b*N, T, d]
        res_t = self.temporal_fc(self.temporal_attn(self.temporal_ln(xt)))
        res_t = res_t.reshape(b, n, frames, d).transpose(1, 2).reshape(b, frames * n, d)
        patches = patches + res_t  # [b, T*N, d]
        # spatial: each frame with its own copy of the class token
        xs = patches.reshape(b * frames, n, d)
        cls_t = cls.expand(b, frames, d).reshape(b * frames, 1, d)
        res_s = self.attn(self.ln_1(torch.cat([cls_t, xs], dim=1)))  # [b*T, 1 + N, d]
        res_cls = res_s[:, 0].reshape(b, frames, d).mean(dim=1, keepdim=True)  # [b, 1, d]
        res_p = res_s[:, 1:].reshape(b, frames * n, d)
        return torch.cat([cls + res_cls, patches + res_p], dim=1)  # [b, 1 + T*N, d]
