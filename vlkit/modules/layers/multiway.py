"""Modality experts: feed-forward blocks chosen per token, behind one shared self-attention.

VLMo's multiway transformer gives vision, language and vision-language tokens their own feed-forward experts
while every token shares the self-attention; BLIP-2's Q-Former gives its learned queries and its text tokens
separate feed-forward blocks in the same way. :class:`MultiwayMLP` is that routing; :class:`MultiwayEncoderLayer`
is a pre-norm encoder layer built on it.

Tokens are routed either by **segments** (``[("text", 12), ("image", 50)]``: consecutive runs of tokens, the
common case of a concatenated sequence, computed by slicing without any gather) or by an **expert index**
``[batch, tokens]`` (any per-token choice).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .attention import KVCache, MultiHeadAttention
from .mlp import MLP

Segments = Sequence[tuple[str, int]]


class MultiwayMLP(nn.Module):
    """One pre-normalised MLP per expert: ``experts[e](norms[e](x))`` for the tokens routed to expert ``e``.

    Args:
        dim: token width.
        hidden: MLP hidden width.
        experts: expert names, e.g. ``("vision", "language", "vl")``.
        act: MLP activation.
        norm_eps: LayerNorm epsilon.
        pre_norm: a LayerNorm per expert before its MLP (False: the caller normalises).
    """

    def __init__(self, dim: int, hidden: int, experts: Sequence[str], act: str = "gelu", norm_eps: float = 1e-6,
                 pre_norm: bool = True):
        super().__init__()
        if not experts or len(set(experts)) != len(experts):
            raise ValueError(f"experts must be distinct names, got {list(experts)}")
        self.names = tuple(experts)
        self.mlps = nn.ModuleDict({name: MLP(dim, hidden, act) for name in self.names})
        self.norms = nn.ModuleDict({name: nn.LayerNorm(dim, eps=norm_eps) if pre_norm else nn.Identity()
                                    for name in self.names})

    def expert(self, name: str, x: Tensor) -> Tensor:
        """All of ``x`` [..., dim] through expert ``name``."""
        if name not in self.mlps:
            raise KeyError(f"unknown expert {name!r}; experts: {', '.join(self.names)}")
        return self.mlps[name](self.norms[name](x))

    def forward(self, x: Tensor, segments: Segments | None = None, expert_index: Tensor | None = None) -> Tensor:
        """``x`` [batch, tokens, dim] -> ``[batch, tokens, dim]``, each token through its expert.

        Args:
            segments: ``(expert, length)`` runs covering the tokens in order.
            expert_index: ``[batch, tokens]`` position in ``experts`` of each token's expert.

        Raises:
            ValueError: neither or both routings given, or segments that do not cover the tokens.
        """
        if (segments is None) == (expert_index is None):
            raise ValueError("route the tokens by segments or by expert_index (one of them)")
        if segments is not None:
            if sum(n for _, n in segments) != x.shape[1]:
                raise ValueError(f"segments {list(segments)} do not cover {x.shape[1]} tokens")
            parts, start = [], 0
            for name, n in segments:
                parts.append(self.expert(name, x[:, start:start + n]))
                start += n
            return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        out = torch.zeros_like(x)
        for i, name in enumerate(self.names):
            chosen = expert_index == i  # [batch, tokens]
            if chosen.any():
                out[chosen] = self.expert(name, x[chosen]).to(out.dtype)
        return out


class MultiwayEncoderLayer(nn.Module):
    """``x + attn(ln_1(x))`` shared by every token, then ``x + expert(x)`` per token (:class:`MultiwayMLP`).

    Args:
        dim: width.
        num_heads: attention heads.
        experts: expert names.
        mlp_ratio: MLP hidden width / dim.
        act: MLP activation.
        norm_eps: LayerNorm epsilon.
        dropout: dropout on the residual branches.
    """

    def __init__(self, dim: int, num_heads: int, experts: Sequence[str], mlp_ratio: float = 4.0, act: str = "gelu",
                 norm_eps: float = 1e-6, dropout: float = 0.0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = MultiHeadAttention(dim, num_heads)
        self.ffn = MultiwayMLP(dim, int(dim * mlp_ratio), experts, act, norm_eps)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, segments: Segments | None = None, expert_index: Tensor | None = None,
                attn_mask: Tensor | None = None, key_padding_mask: Tensor | None = None, is_causal: bool = False,
                kv_cache: KVCache | None = None) -> Tensor:
        """``x`` [batch, tokens, dim] -> ``[batch, tokens, dim]``; masks as :class:`MultiHeadAttention`."""
        x = x + self.drop(self.attn(self.ln_1(x), attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                                    is_causal=is_causal, kv_cache=kv_cache))
        return x + self.drop(self.ffn(x, segments, expert_index))
