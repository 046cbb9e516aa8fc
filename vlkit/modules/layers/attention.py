"""Multi-head attention on ``scaled_dot_product_attention``: self and cross attention, padding and causal
masks, and a key/value cache for incremental decoding. On request (:func:`recording_attention`) a layer computes
its attention explicitly and keeps the probabilities, which the fused kernel never forms (explanations read them)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class KVCache:
    """Keys and values of the tokens decoded so far, preallocated to ``max_len``.

    Attributes:
        keys: ``[batch, heads, max_len, head_dim]``.
        values: ``[batch, heads, max_len, head_dim]``.
        length: number of valid positions.
    """

    keys: Tensor
    values: Tensor
    length: int = 0

    @classmethod
    def empty(cls, batch: int, heads: int, max_len: int, head_dim: int, device=None, dtype=None) -> "KVCache":
        shape = (batch, heads, max_len, head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store ``k``/``v`` of new tokens ``[batch, heads, new, head_dim]``; return all keys/values so far."""
        end = self.length + k.shape[2]
        if end > self.keys.shape[2]:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {self.keys.shape[2]}")
        self.keys[:, :, self.length : end] = k
        self.values[:, :, self.length : end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


def merge_masks(
    attn_mask: Tensor | None, key_padding_mask: Tensor | None, batch: int, q_len: int, k_len: int
) -> Tensor | None:
    """One boolean mask ``[batch, 1, q_len, k_len]`` (True = attend) from an attention mask and a padding mask.

    Args:
        attn_mask: ``[q_len, k_len]`` or ``[batch, q_len, k_len]``, boolean (True = attend) or additive float.
        key_padding_mask: ``[batch, k_len]``, True (or 1) where the key is a real token.
    """
    mask = None
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool:
            attn_mask = attn_mask > -1e4  # additive masks: large negatives mean "do not attend"
        mask = attn_mask.reshape(-1, 1, q_len, k_len) if attn_mask.dim() == 3 else attn_mask[None, None]
    if key_padding_mask is not None:
        pad = key_padding_mask.to(torch.bool)[:, None, None, :]  # [batch, 1, 1, k_len]
        mask = pad if mask is None else mask & pad
    if mask is not None:
        mask = mask.expand(batch, 1, q_len, k_len)
    return mask


def explicit_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, is_causal: bool = False,
                       dropout_p: float = 0.0) -> tuple[Tensor, Tensor]:
    """Attention written out: ``softmax(q k^T / sqrt(head_dim))`` masked, then times ``v``; the same result as
    ``scaled_dot_product_attention`` with the same arguments, and its probabilities.

    Args:
        q: ``[batch, heads, q_len, head_dim]``.
        k, v: ``[batch, heads, k_len, head_dim]``.
        mask: boolean, True = attend, broadcastable to ``[batch, heads, q_len, k_len]``.
        is_causal: query ``i`` attends to keys ``<= i`` (top-left aligned, as the fused kernel).
        dropout_p: dropout on the probabilities (the returned probabilities are those before dropout).

    Returns:
        The output ``[batch, heads, q_len, head_dim]`` and the probabilities ``[batch, heads, q_len, k_len]``,
        both in the autograd graph.
    """
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # [batch, heads, q_len, k_len]
    if is_causal:
        causal = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        mask = causal if mask is None else mask & causal
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1)
    dropped = F.dropout(probs, dropout_p) if dropout_p > 0 else probs
    return dropped @ v, probs


@contextlib.contextmanager
def recording_attention(*layers: "MultiHeadAttention") -> Iterator[None]:
    """While the block runs, ``layers`` compute their attention explicitly (:func:`explicit_attention`) and keep
    the probabilities of their last call in ``attention_probs`` (in the autograd graph, so a gradient can be
    taken with respect to them). Off by default: the fused kernel is faster and forms no probabilities.

    Example:
        >>> with recording_attention(layer.cross_attn):
        ...     out = model(...)
        ...     probs = layer.cross_attn.attention_probs  # [batch, heads, q_len, k_len]
    """
    for layer in layers:
        layer.record_attention = True
    try:
        yield
    finally:
        for layer in layers:
            layer.record_attention = False
            layer.attention_probs = None


class MultiHeadAttention(nn.Module):
    """Multi-head attention. Self-attention uses one fused ``in_proj`` (q, k, v); cross-attention
    (``kv_dim`` given) projects queries with ``q_proj`` and the context with ``kv_proj``.

    Args:
        dim: model width (queries and output).
        num_heads: attention heads; ``dim`` must divide evenly.
        kv_dim: width of the context for cross-attention (None: self-attention).
        bias: biases on the projections.
        dropout: attention dropout (training only).
        qk_norm: LayerNorm on each head's queries and keys before their dot product (ViT-22B).
        norm_eps: epsilon of those LayerNorms.
    """

    #: compute attention explicitly and keep its probabilities (see :func:`recording_attention`)
    record_attention: bool = False
    #: ``[batch, heads, q_len, k_len]`` of the last call while recording, else None
    attention_probs: Tensor | None = None

    def __init__(self, dim: int, num_heads: int, kv_dim: int | None = None, bias: bool = True, dropout: float = 0.0,
                 qk_norm: bool = False, norm_eps: float = 1e-6):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.cross = kv_dim is not None
        if self.cross:
            self.q_proj = nn.Linear(dim, dim, bias=bias)
            self.kv_proj = nn.Linear(kv_dim, 2 * dim, bias=bias)
        else:
            self.in_proj = nn.Linear(dim, 3 * dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)
        self.dropout = dropout
        self.q_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()

    def _heads(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # [batch, heads, tokens, head_dim]

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        attn_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
        kv_cache: KVCache | None = None,
        context_kv: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """Attend from ``x`` [batch, q_len, dim] to itself or to ``context`` [batch, k_len, kv_dim].

        Args:
            attn_mask: boolean (True = attend) or additive, ``[q_len, k_len]`` or ``[batch, q_len, k_len]``.
            key_padding_mask: ``[batch, k_len]``, True where the key is a real token.
            is_causal: each query attends only to keys at or before its position. With ``kv_cache``, the new
                tokens follow the cached ones, so query i attends to keys ``< cached + i + 1``.
            kv_cache: self-attention cache for incremental decoding (keys/values of earlier tokens).
            context_kv: cross-attention keys and values from :meth:`context_kv`, computed once per context
                (incremental decoding); replaces ``context``.

        Returns:
            ``[batch, q_len, dim]``.
        """
        b, q_len, _ = x.shape
        if self.cross:
            q = self.q_norm(self._heads(self.q_proj(x)))
            k, v = context_kv if context_kv is not None else self.context_kv(context)
        else:
            q, k, v = (self._heads(t) for t in self.in_proj(x).chunk(3, dim=-1))
            q, k = self.q_norm(q), self.k_norm(k)
        past = 0
        if kv_cache is not None:
            past = kv_cache.length
            k, v = kv_cache.append(k, v)
        k_len = k.shape[2]
        mask = merge_masks(attn_mask, key_padding_mask, b, q_len, k_len)
        causal_fast = is_causal and mask is None and past == 0
        if is_causal and not causal_fast:
            causal = torch.ones(q_len, k_len, dtype=torch.bool, device=x.device).tril(diagonal=past)
            mask = causal[None, None] if mask is None else mask & causal
        dropout_p = self.dropout if self.training else 0.0
        if self.record_attention:
            out, self.attention_probs = explicit_attention(q, k, v, mask, causal_fast, dropout_p)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal_fast)
        # out: [batch, heads, q_len, head_dim]
        out = out.transpose(1, 2).reshape(b, q_len, self.dim)
        return self.out_proj(out)

    def context_kv(self, context: Tensor | None) -> tuple[Tensor, Tensor]:
        """Cross-attention keys and values of ``context`` [batch, k_len, kv_dim], each
        ``[batch, heads, k_len, head_dim]``: computed once per image when decoding token by token."""
        if not self.cross:
            raise ValueError("context_kv is for cross-attention")
        if context is None:
            raise ValueError("cross-attention needs a context")
        k, v = self.kv_proj(context).chunk(2, dim=-1)
        return self.k_norm(self._heads(k)), self._heads(v)

    def forward_at(self, x: Tensor, index: Tensor, is_causal: bool = False,
                   key_padding_mask: Tensor | None = None) -> Tensor:
        """Self-attention output for one query position per sequence: ``x`` [batch, tokens, dim] and
        ``index`` [batch] -> ``[batch, 1, dim]``.

        Equal to ``forward(x, ...)[range(batch), index]`` at a fraction of the cost: keys and values are
        computed for every token, the query and the output projection only at ``index``. Used by encoders
        whose last layer is only read at a pooled position (CLIP's class token, its end-of-text token).
        """
        if self.cross:
            raise ValueError("forward_at is for self-attention")
        b, n, d = x.shape
        w_q, w_kv = self.in_proj.weight[:d], self.in_proj.weight[d:]
        b_q, b_kv = (None, None) if self.in_proj.bias is None else (self.in_proj.bias[:d], self.in_proj.bias[d:])
        rows = x[torch.arange(b, device=x.device), index][:, None]  # [batch, 1, dim]
        q = self.q_norm(self._heads(F.linear(rows, w_q, b_q)))  # [batch, heads, 1, head_dim]
        k, v = (self._heads(t) for t in F.linear(x, w_kv, b_kv).chunk(2, dim=-1))
        k = self.k_norm(k)
        mask = None
        if is_causal:
            mask = (torch.arange(n, device=x.device)[None] <= index[:, None])[:, None, None]  # [batch, 1, 1, n]
        if key_padding_mask is not None:
            pad = key_padding_mask.to(torch.bool)[:, None, None, :]
            mask = pad if mask is None else mask & pad
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [batch, heads, 1, head_dim]
        return self.out_proj(out.transpose(1, 2).reshape(b, 1, d))

