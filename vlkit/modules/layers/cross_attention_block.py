"""A pre-norm cross-attention block: queries attend to a normalised context, then an MLP (the cross-attention
half of CoCa's multimodal decoder layers, whose self-attention half is a
:class:`~vlkit.modules.layers.transformer.TransformerEncoderLayer`)."""

from __future__ import annotations

from torch import Tensor, nn

from .attention import MultiHeadAttention
from .mlp import MLP


class CrossAttentionBlock(nn.Module):
    """``x + attn(ln_1(x), ln_kv(context)); x + mlp(ln_2(x))``.

    Args:
        dim: width of the queries.
        num_heads: attention heads.
        context_dim: width of the context tokens (default ``dim``).
        mlp_ratio: MLP hidden width / dim.
        act: MLP activation.
        norm_eps: LayerNorm epsilon.
    """

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None, mlp_ratio: float = 4.0,
                 act: str = "gelu", norm_eps: float = 1e-5):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=norm_eps)
        self.ln_kv = nn.LayerNorm(context_dim or dim, eps=norm_eps)
        self.attn = MultiHeadAttention(dim, num_heads, kv_dim=context_dim or dim)
        self.ln_2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio), act)

    def context_kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of ``context`` [batch, tokens, context_dim], each ``[batch, heads, tokens, head_dim]``
        (computed once per image when decoding token by token)."""
        return self.attn.context_kv(self.ln_kv(context))

    def forward(self, x: Tensor, context: Tensor | None = None, context_padding_mask: Tensor | None = None,
                cross_kv: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Attend from ``x`` [batch, length, dim] to ``context`` (or to its precomputed ``cross_kv``).

        Args:
            context_padding_mask: ``[batch, tokens]``, True on real context tokens (None: all real).

        Returns:
            ``[batch, length, dim]``.
        """
        kv = cross_kv if cross_kv is not None else self.context_kv(context)
        x = x + self.attn(self.ln_1(x), key_padding_mask=context_padding_mask, context_kv=kv)
        return x + self.mlp(self.ln_2(x))  # [batch, length, dim]
