"""Pre-norm transformer encoder and decoder layers, and a stack with activation checkpointing."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .attention import KVCache, MultiHeadAttention
from .mlp import MLP


class TransformerEncoderLayer(nn.Module):
    """x + attn(ln_1(x)); x + mlp(ln_2(x)). With ``parallel`` (ViT-22B): x + attn(ln_1(x)) + mlp(ln_1(x)),
    one LayerNorm and no ``ln_2``.

    Args:
        dim: width.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / dim.
        act: MLP activation.
        norm_eps: LayerNorm epsilon.
        dropout: dropout on the residual branches.
        qk_norm: LayerNorm on queries and keys (see :class:`MultiHeadAttention`).
        parallel: attention and MLP in parallel on one normalised input.
        bias: biases on the attention and MLP projections.
    """

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float = 4.0, act: str = "gelu", norm_eps: float = 1e-5,
        dropout: float = 0.0, qk_norm: bool = False, parallel: bool = False, bias: bool = True,
    ):
        super().__init__()
        self.parallel = parallel
        self.ln_1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = MultiHeadAttention(dim, num_heads, bias=bias, qk_norm=qk_norm, norm_eps=norm_eps)
        if not parallel:
            self.ln_2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio), act, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(
        self, x: Tensor, attn_mask: Tensor | None = None, key_padding_mask: Tensor | None = None,
        is_causal: bool = False, kv_cache: KVCache | None = None, output_index: Tensor | None = None,
    ) -> Tensor:
        """``output_index`` ([batch] positions): compute and return only those rows, ``[batch, 1, dim]``
        (see :meth:`forward_at`); passing it through ``__call__`` keeps module hooks (FSDP) working."""
        if output_index is not None:
            return self.forward_at(x, output_index, key_padding_mask, is_causal)
        if self.parallel:
            h = self.ln_1(x)
            attn = self.attn(h, attn_mask=attn_mask, key_padding_mask=key_padding_mask, is_causal=is_causal,
                             kv_cache=kv_cache)
            return x + self.drop(attn) + self.drop(self.mlp(h))  # [batch, tokens, dim]
        x = x + self.drop(self.attn(self.ln_1(x), attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                                    is_causal=is_causal, kv_cache=kv_cache))
        return x + self.drop(self.mlp(self.ln_2(x)))  # [batch, tokens, dim]

    def forward_at(self, x: Tensor, index: Tensor, key_padding_mask: Tensor | None = None,
                   is_causal: bool = False) -> Tensor:
        """The layer's output at one position per sequence, ``[batch, 1, dim]`` (see
        :meth:`MultiHeadAttention.forward_at`): the MLP runs on one token instead of all."""
        rows = x[torch.arange(x.shape[0], device=x.device), index][:, None]  # [batch, 1, dim]
        attn = self.drop(self.attn.forward_at(self.ln_1(x), index, is_causal, key_padding_mask))
        if self.parallel:
            return rows + attn + self.drop(self.mlp(self.ln_1(rows)))
        rows = rows + attn
        return rows + self.drop(self.mlp(self.ln_2(rows)))


class TransformerDecoderLayer(nn.Module):
    """Causal self-attention, cross-attention to a context (e.g. image tokens), MLP; all pre-norm.

    Args:
        dim: width.
        num_heads: attention heads.
        context_dim: width of the context tokens.
        mlp_ratio: MLP hidden width / dim.
        act: MLP activation.
        norm_eps: LayerNorm epsilon.
    """

    def __init__(
        self, dim: int, num_heads: int, context_dim: int | None = None, mlp_ratio: float = 4.0, act: str = "gelu",
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=norm_eps)
        self.self_attn = MultiHeadAttention(dim, num_heads)
        self.ln_cross = nn.LayerNorm(dim, eps=norm_eps)
        self.cross_attn = MultiHeadAttention(dim, num_heads, kv_dim=context_dim or dim)
        self.ln_2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio), act)

    def forward(
        self, x: Tensor, context: Tensor, key_padding_mask: Tensor | None = None,
        context_padding_mask: Tensor | None = None, is_causal: bool = True, kv_cache: KVCache | None = None,
        cross_kv: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """``cross_kv``: the cross-attention keys/values of ``context`` from ``cross_attn.context_kv`` (computed
        once per image when decoding token by token; ``context`` may then be None)."""
        x = x + self.self_attn(self.ln_1(x), key_padding_mask=key_padding_mask, is_causal=is_causal,
                               kv_cache=kv_cache)
        x = x + self.cross_attn(self.ln_cross(x), context, key_padding_mask=context_padding_mask,
                                context_kv=cross_kv)
        return x + self.mlp(self.ln_2(x))  # [batch, tokens, dim]


class Transformer(nn.Module):
    """A stack of encoder layers; ``grad_checkpointing`` recomputes each layer in the backward pass.

    Args:
        layers: the layers, applied in order.
    """

    def __init__(self, layers: Sequence[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.grad_checkpointing = False

    def forward(
        self, x: Tensor, attn_mask: Tensor | None = None, key_padding_mask: Tensor | None = None,
        is_causal: bool = False, kv_caches: Sequence[KVCache] | None = None, output_index: Tensor | None = None,
    ) -> Tensor:
        """Run the stack on ``x`` [batch, tokens, dim].

        Args:
            output_index: if given ([batch] positions), only the output at these positions is wanted: the
                last layer computes just them and ``[batch, 1, dim]`` is returned.
        """
        layers = list(self.layers)
        last = None
        if output_index is not None and attn_mask is None and kv_caches is None:
            layers, last = layers[:-1], layers[-1]
        for i, layer in enumerate(layers):
            cache = kv_caches[i] if kv_caches is not None else None
            if self.grad_checkpointing and self.training and cache is None:
                x = checkpoint(layer, x, attn_mask, key_padding_mask, is_causal, use_reentrant=False)
            else:
                x = layer(x, attn_mask=attn_mask, key_padding_mask=key_padding_mask, is_causal=is_causal,
                          kv_cache=cache)
        if last is not None:
            return last(x, key_padding_mask=key_padding_mask, is_causal=is_causal, output_index=output_index)
        if output_index is not None:
            return x[torch.arange(x.shape[0], device=x.device), output_index][:, None]
        return x
