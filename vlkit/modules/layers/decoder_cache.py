"""What a text decoder keeps between decoding steps: per-layer self-attention key/value caches, the image
context's cross-attention keys/values (computed once per image), and the context's padding mask."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .attention import KVCache


@dataclass
class DecoderCache:
    """The state of an incremental decode of a batch of sequences.

    Attributes:
        self_kv: one :class:`KVCache` per self-attention layer, ``[batch, heads, max_len, head_dim]``.
        cross_kv: ``(keys, values)`` per cross-attention layer, ``[batch, heads, context, head_dim]``, computed
            once from the image context.
        context_mask: ``[batch, context]`` True on real context tokens (None: all real).
        extra: tensors a model keeps per sequence besides these (batch first), reordered with them.
    """

    self_kv: list[KVCache]
    cross_kv: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    context_mask: Tensor | None = None
    extra: dict[str, Tensor] = field(default_factory=dict)

    @property
    def length(self) -> int:
        """Tokens decoded so far (the position of the next token)."""
        return self.self_kv[0].length if self.self_kv else 0

    @property
    def max_length(self) -> int:
        return self.self_kv[0].keys.shape[2] if self.self_kv else 0

    @property
    def batch_size(self) -> int:
        return self.self_kv[0].keys.shape[0]

    @staticmethod
    def new_self_kv(layers: int, batch: int, heads: int, max_len: int, head_dim: int, device=None,
                    dtype=None) -> list[KVCache]:
        """Empty self-attention caches for ``layers`` layers."""
        return [KVCache.empty(batch, heads, max_len, head_dim, device, dtype) for _ in range(layers)]

    def repeat_interleave(self, n: int) -> "DecoderCache":
        """Each sequence repeated ``n`` times in a row (beams or samples of one image): ``[b0, b0, b1, b1, ...]``.
        The context's keys/values are copied, not recomputed."""
        if n == 1:
            return self
        rep = lambda t: t.repeat_interleave(n, dim=0)  # noqa: E731
        return DecoderCache(
            self_kv=[KVCache(rep(c.keys), rep(c.values), c.length) for c in self.self_kv],
            cross_kv=[(rep(k), rep(v)) for k, v in self.cross_kv],
            context_mask=None if self.context_mask is None else rep(self.context_mask),
            extra={k: rep(v) for k, v in self.extra.items()},
        )

    def reorder(self, index: Tensor) -> None:
        """Keep the sequences at ``index`` [batch] (beam search: each beam continues from its parent). The
        self-attention caches are gathered in place; the context's keys/values are gathered only when a row
        takes another image's place (never within beam search, where beams stay with their image)."""
        for c in self.self_kv:
            c.keys = c.keys.index_select(0, index)
            c.values = c.values.index_select(0, index)
        for name, t in self.extra.items():
            self.extra[name] = t.index_select(0, index)

    def select(self, index: Tensor) -> "DecoderCache":
        """A cache of the sequences at ``index`` only (everything gathered, the context included)."""
        pick = lambda t: t.index_select(0, index)  # noqa: E731
        return DecoderCache(
            self_kv=[KVCache(pick(c.keys), pick(c.values), c.length) for c in self.self_kv],
            cross_kv=[(pick(k), pick(v)) for k, v in self.cross_kv],
            context_mask=None if self.context_mask is None else pick(self.context_mask),
            extra={k: pick(v) for k, v in self.extra.items()},
        )


def positions(cache: DecoderCache | None, new: int, device: torch.device) -> Tensor:
    """Position ids ``[new]`` of the next ``new`` tokens after what ``cache`` holds."""
    start = cache.length if cache is not None else 0
    return torch.arange(start, start + new, device=device)
