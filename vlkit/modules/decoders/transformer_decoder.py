"""A causal transformer text decoder that reads an image context through cross-attention.

Any vlkit image encoder composes with it: the encoder's tokens (``[batch, context, context_dim]``) are the
context, and the decoder writes text about them. It trains by teacher forcing (:meth:`forward`) and decodes
token by token through a :class:`~vlkit.modules.layers.decoder_cache.DecoderCache` (:meth:`start`,
:meth:`step`), which is what :func:`vlkit.inference.generate.generate` drives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from vlkit.modules.layers.decoder_cache import DecoderCache, positions
from vlkit.modules.layers.transformer import TransformerDecoderLayer, TransformerEncoderLayer


@dataclass
class TextDecoderConfig:
    """Sizes of a :class:`TransformerTextDecoder`.

    Attributes:
        vocab_size: tokens in the vocabulary (rows of the embedding and of the logits).
        width: model width.
        layers: transformer layers.
        heads: attention heads per layer.
        context_dim: width of the context tokens (None: ``width``).
        max_length: most tokens a sequence holds (learned positions), the start token included.
        mlp_ratio: MLP hidden width / ``width``.
        norm_eps: LayerNorm epsilon.
        tie_word_embeddings: the LM head reuses the token embedding matrix.
        cross_attention_layers: indices of the layers that cross-attend to the context (None: all); the
            others are causal self-attention layers only.
        act: MLP activation (see :func:`vlkit.modules.layers.mlp.activation`).
    """

    vocab_size: int
    width: int = 512
    layers: int = 6
    heads: int = 8
    context_dim: int | None = None
    max_length: int = 64
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    cross_attention_layers: Sequence[int] | None = None
    act: str = "gelu"

    def cross_layers(self) -> tuple[int, ...]:
        """The sorted indices of the cross-attending layers (checked against ``layers``)."""
        if self.cross_attention_layers is None:
            return tuple(range(self.layers))
        chosen = tuple(sorted(set(int(i) for i in self.cross_attention_layers)))
        bad = [i for i in chosen if not 0 <= i < self.layers]
        if bad:
            raise ValueError(f"cross_attention_layers {bad} out of range for a decoder of {self.layers} layers")
        return chosen


class TransformerTextDecoder(nn.Module):
    """Pre-norm causal text decoder: token + learned position embedding, layers (cross-attending or
    text-only), final LayerNorm, LM head (tied to the token embedding by default).

    Args:
        config: the sizes.

    Example:
        >>> dec = TransformerTextDecoder(TextDecoderConfig(vocab_size=100, width=32, layers=2, heads=2))
        >>> ctx = torch.randn(2, 5, 32)                       # [batch, context, context_dim]
        >>> ids = torch.randint(0, 100, (2, 7))
        >>> dec(ids, ctx).shape
        torch.Size([2, 7, 100])
        >>> cache = dec.start(ctx, max_length=8)
        >>> dec.step(ids[:, :3], cache).shape                # then one token at a time
        torch.Size([2, 3, 100])
    """

    def __init__(self, config: TextDecoderConfig):
        super().__init__()
        self.config = config
        c = config
        cross = set(c.cross_layers())
        context_dim = c.context_dim or c.width
        self.token_embedding = nn.Embedding(c.vocab_size, c.width)
        self.positional_embedding = nn.Parameter(torch.empty(c.max_length, c.width))
        self.layers = nn.ModuleList(
            TransformerDecoderLayer(c.width, c.heads, context_dim, c.mlp_ratio, c.act, c.norm_eps) if i in cross
            else TransformerEncoderLayer(c.width, c.heads, c.mlp_ratio, c.act, c.norm_eps)
            for i in range(c.layers)
        )
        self.is_cross = [i in cross for i in range(c.layers)]
        self.ln_final = nn.LayerNorm(c.width, eps=c.norm_eps)
        self.lm_head = nn.Linear(c.width, c.vocab_size, bias=False)
        self.reset_parameters()
        if c.tie_word_embeddings:
            self.lm_head.weight = self.token_embedding.weight

    def reset_parameters(self) -> None:
        """Normal(0, 0.02) token embedding and head, Normal(0, 0.01) positions (the layers keep their own)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if not self.config.tie_word_embeddings:
            nn.init.normal_(self.lm_head.weight, std=0.02)

    @property
    def num_heads(self) -> int:
        return self.config.heads

    def embed(self, input_ids: Tensor, start: int = 0) -> Tensor:
        """Token plus position embeddings of ``input_ids`` ``[batch, new]`` at positions ``start, start + 1, ...``
        -> ``[batch, new, width]``."""
        new = input_ids.shape[1]
        if start + new > self.config.max_length:
            raise ValueError(f"{start + new} tokens exceed the decoder's max_length {self.config.max_length}")
        pos = positions(None, new, input_ids.device) + start
        return self.token_embedding(input_ids) + self.positional_embedding[pos]  # [batch, new, width]

    def forward(self, input_ids: Tensor, context: Tensor, context_mask: Tensor | None = None,
                attention_mask: Tensor | None = None) -> Tensor:
        """Teacher forcing over whole sequences.

        Args:
            input_ids: ``[batch, length]``, each row starting with the start token, padded on the right.
            context: ``[batch, context, context_dim]`` image tokens.
            context_mask: ``[batch, context]`` True (or 1) on real context tokens (None: all real).
            attention_mask: ``[batch, length]`` 1 on tokens, 0 on padding (None: no padding).

        Returns:
            logits ``[batch, length, vocab]``; position ``t`` predicts token ``t + 1``.
        """
        return self.lm_head(self.hidden_states(input_ids, context, context_mask, attention_mask))

    def hidden_states(self, input_ids: Tensor, context: Tensor, context_mask: Tensor | None = None,
                      attention_mask: Tensor | None = None) -> Tensor:
        """The final-normed hidden states of :meth:`forward`, ``[batch, length, width]`` (before the LM head)."""
        x = self.embed(input_ids)  # [batch, length, width]
        pad = None if attention_mask is None else attention_mask.to(torch.bool)
        for layer, cross in zip(self.layers, self.is_cross):
            if cross:
                x = layer(x, context, key_padding_mask=pad, context_padding_mask=context_mask, is_causal=True)
            else:
                x = layer(x, key_padding_mask=pad, is_causal=True)
        return self.ln_final(x)

    def start(self, context: Tensor, context_mask: Tensor | None = None, max_length: int | None = None
              ) -> DecoderCache:
        """Begin an incremental decode over ``context`` ``[batch, context, context_dim]``.

        The cross-attention keys/values of every cross-attending layer are computed here, once; the
        self-attention caches are empty and hold ``max_length`` tokens (None: the decoder's ``max_length``).

        Raises:
            ValueError: ``max_length`` beyond the decoder's positions.
        """
        max_length = max_length or self.config.max_length
        if max_length > self.config.max_length:
            raise ValueError(f"a cache of {max_length} tokens exceeds the decoder's max_length "
                             f"{self.config.max_length}")
        weight = self.token_embedding.weight
        cross_kv = [layer.cross_attn.context_kv(context) for layer, cross in zip(self.layers, self.is_cross)
                    if cross]  # each [batch, heads, context, head_dim]
        self_kv = DecoderCache.new_self_kv(len(self.layers), context.shape[0], self.config.heads, max_length,
                                           self.config.width // self.config.heads, weight.device, weight.dtype)
        mask = None if context_mask is None else context_mask.to(torch.bool)
        return DecoderCache(self_kv=self_kv, cross_kv=cross_kv, context_mask=mask)

    def step(self, input_ids: Tensor, cache: DecoderCache) -> Tensor:
        """Run the tokens after those ``cache`` holds, ``input_ids`` ``[batch, new]``, appending their keys and
        values to the cache.

        Returns:
            logits ``[batch, new, vocab]``, equal to :meth:`forward` at these positions.
        """
        x = self.embed(input_ids, start=cache.length)  # [batch, new, width]
        j = 0
        for i, (layer, cross) in enumerate(zip(self.layers, self.is_cross)):
            if cross:
                x = layer(x, None, context_padding_mask=cache.context_mask, is_causal=True,
                          kv_cache=cache.self_kv[i], cross_kv=cache.cross_kv[j])
                j += 1
            else:
                x = layer(x, is_causal=True, kv_cache=cache.self_kv[i])
        return self.lm_head(self.ln_final(x))


def text_decoder(vocab_size: int, width: int = 512, layers: int = 6, heads: int = 8, context_dim: int | None = None,
                 max_length: int = 64, **kwargs) -> TransformerTextDecoder:
    """Build a :class:`TransformerTextDecoder` from sizes (further :class:`TextDecoderConfig` fields as keywords)."""
    return TransformerTextDecoder(TextDecoderConfig(vocab_size, width, layers, heads, context_dim, max_length,
                                                    **kwargs))
