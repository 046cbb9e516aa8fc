"""Attention pooling: learned queries attend to a sequence of tokens."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .attention import MultiHeadAttention


class AttentionPool(nn.Module):
    """Pools ``[batch, tokens, context_dim]`` into ``[batch, num_queries, dim]`` with learned queries
    (the pooler of CoCa and SigLIP; one query gives a single pooled vector).

    Args:
        dim: width of the queries and the output.
        num_heads: attention heads.
        num_queries: learned queries.
        context_dim: width of the tokens (default ``dim``).
        norm_eps: LayerNorm epsilon.
        query_norm: LayerNorm the queries before they attend (``ln_q``, as open_clip's pooler does).
        out_norm: LayerNorm the pooled output (``ln_out``).
    """

    def __init__(self, dim: int, num_heads: int, num_queries: int = 1, context_dim: int | None = None,
                 norm_eps: float = 1e-5, query_norm: bool = False, out_norm: bool = True):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * dim**-0.5)
        self.ln_q = nn.LayerNorm(dim, eps=norm_eps) if query_norm else None
        self.ln_context = nn.LayerNorm(context_dim or dim, eps=norm_eps)
        self.attn = MultiHeadAttention(dim, num_heads, kv_dim=context_dim or dim)
        self.ln_out = nn.LayerNorm(dim, eps=norm_eps) if out_norm else None

    def forward(self, tokens: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        q = self.queries if self.ln_q is None else self.ln_q(self.queries)
        q = q[None].expand(tokens.shape[0], -1, -1)  # [batch, queries, dim]
        out = self.attn(q, self.ln_context(tokens), key_padding_mask=key_padding_mask)
        return out if self.ln_out is None else self.ln_out(out)  # [batch, queries, dim]
