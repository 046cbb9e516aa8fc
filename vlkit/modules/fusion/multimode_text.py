"""One text transformer that serves three modes with mostly shared weights (BLIP, Li et al. 2022):

- ``text``: the unimodal encoder, bidirectional self-attention and feed-forward, no cross-attention (its first
  token, [CLS], gives the contrastive embedding);
- ``encoder``: the image-grounded encoder, bidirectional self-attention, cross-attention to image tokens and
  feed-forward; the first token's word embedding is replaced by a learned [ENC] marker (matching reads it);
- ``decoder``: the image-grounded decoder, a causal self-attention of its own, then the same cross-attention
  and feed-forward; the first token is a learned [DEC] marker (captions are written after it).

The embeddings, the bidirectional self-attention, the cross-attention, the feed-forward blocks and the final
LayerNorm are one set of tensors; only the decoder's causal self-attention (and its LayerNorm) is separate, as
in the paper. Layers are pre-norm (vlkit's :class:`~vlkit.modules.layers.transformer.TransformerDecoderLayer`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vlkit.modules.fusion.text_encoder import TextEmbeddings
from vlkit.modules.layers.attention import KVCache, MultiHeadAttention
from vlkit.modules.layers.decoder_cache import DecoderCache
from vlkit.modules.layers.transformer import TransformerDecoderLayer

MODES = ("text", "encoder", "decoder")


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown text mode {mode!r}; choose one of {MODES}")


class MultimodeTextLayer(TransformerDecoderLayer):
    """A pre-norm decoder layer whose ``self_attn`` is bidirectional (the encoder modes), with a second, causal
    self-attention (``causal_attn`` after ``ln_causal``) for the decoder mode; cross-attention and the MLP serve
    both image-grounded modes, and the ``text`` mode skips cross-attention.

    Args:
        dim: width.
        num_heads: attention heads.
        context_dim: width of the image tokens.
        mlp_ratio: MLP hidden width / dim.
        act: MLP activation.
        norm_eps: LayerNorm epsilon.
    """

    def __init__(self, dim: int, num_heads: int, context_dim: int, mlp_ratio: float = 4.0, act: str = "gelu",
                 norm_eps: float = 1e-6):
        super().__init__(dim, num_heads, context_dim, mlp_ratio, act, norm_eps)
        self.ln_causal = nn.LayerNorm(dim, eps=norm_eps)
        self.causal_attn = MultiHeadAttention(dim, num_heads)

    def forward(self, x: Tensor, mode: str = "text", key_padding_mask: Tensor | None = None,
                context: Tensor | None = None, context_mask: Tensor | None = None, kv_cache: KVCache | None = None,
                cross_kv: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """``x`` [batch, tokens, dim] -> ``[batch, tokens, dim]``.

        Args:
            mode: ``text``, ``encoder`` or ``decoder`` (see the module docstring).
            key_padding_mask: ``[batch, tokens]`` 1 on real tokens (encoder modes; the decoder is causal, so
                padding after a caption changes nothing before it and is not needed).
            context: image tokens ``[batch, context, context_dim]`` (image-grounded modes, unless ``cross_kv``).
            context_mask: ``[batch, context]`` True on real image tokens (None: all).
            kv_cache: the causal self-attention's cache (decoder mode, incremental decoding).
            cross_kv: the cross-attention keys/values of ``context``, computed once per image.
        """
        if mode == "decoder":
            x = x + self.causal_attn(self.ln_causal(x), is_causal=True, kv_cache=kv_cache)
        else:
            x = x + self.self_attn(self.ln_1(x), key_padding_mask=key_padding_mask)
        if mode != "text":
            x = x + self.cross_attn(self.ln_cross(x), context, key_padding_mask=context_mask, context_kv=cross_kv)
        return x + self.mlp(self.ln_2(x))  # [batch, tokens, dim]


class MultimodeTextTransformer(nn.Module):
    """Embeddings, ``layers`` :class:`MultimodeTextLayer` s and a final LayerNorm; see the module docstring.

    Args:
        vocab_size: number of token ids.
        dim: width.
        layers: layers.
        num_heads: attention heads.
        context_length: most tokens (learned positions).
        context_dim: width of the image tokens the image-grounded modes attend to.
        mlp_ratio: MLP hidden width / dim.
        act: MLP activation.
        norm_eps: LayerNorm epsilon.

    Example:
        >>> text = MultimodeTextTransformer(1000, 64, 2, 2, 32, context_dim=64)
        >>> text(ids, mask)                                           # [batch, length, 64], unimodal
        >>> text(ids, mask, mode="encoder", context=image_tokens)     # [ENC] first, image-grounded
        >>> text(ids, mode="decoder", context=image_tokens)           # [DEC] first, causal
    """

    def __init__(self, vocab_size: int, dim: int, layers: int, num_heads: int, context_length: int,
                 context_dim: int, mlp_ratio: float = 4.0, act: str = "gelu", norm_eps: float = 1e-6):
        super().__init__()
        self.embed = TextEmbeddings(vocab_size, dim, context_length)
        self.markers = nn.ParameterDict({"encoder": nn.Parameter(torch.randn(dim) * 0.02),
                                         "decoder": nn.Parameter(torch.randn(dim) * 0.02)})
        self.layers = nn.ModuleList([MultimodeTextLayer(dim, num_heads, context_dim, mlp_ratio, act, norm_eps)
                                     for _ in range(layers)])
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.dim, self.num_heads, self.context_length = dim, num_heads, context_length
        self.grad_checkpointing = False

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.embed.word_embed

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def embeddings(self, input_ids: Tensor, mode: str = "text", start: int = 0) -> Tensor:
        """``[batch, new]`` ids at positions ``start ...`` -> ``[batch, new, dim]``; in the image-grounded modes
        the token at position 0 takes the mode's marker instead of its word embedding."""
        check_mode(mode)
        end = start + input_ids.shape[1]
        if end > self.context_length:
            raise ValueError(f"{end} tokens exceed the context length {self.context_length}")
        x = self.embed.word_embed(input_ids)  # [batch, new, dim]
        if mode != "text" and start == 0 and input_ids.shape[1] > 0:
            marker = self.markers[mode].to(x.dtype)[None, None].expand(x.shape[0], 1, -1)
            x = torch.cat([marker, x[:, 1:]], dim=1)
        return x + self.embed.pos_embed[start:end].to(x.dtype)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, mode: str = "text",
                context: Tensor | None = None, context_mask: Tensor | None = None) -> Tensor:
        """Token features ``[batch, length, dim]`` (after the final LayerNorm) of whole sequences.

        Args:
            input_ids: ``[batch, length]``, starting with the start token ([CLS]).
            attention_mask: ``[batch, length]`` 1 on real tokens (encoder modes; the decoder is causal).
            mode: ``text``, ``encoder`` or ``decoder``.
            context: image tokens ``[batch, context, context_dim]`` (image-grounded modes).
            context_mask: ``[batch, context]`` True on real image tokens (None: all).

        Raises:
            ValueError: an unknown mode, or an image-grounded mode without a context.
        """
        check_mode(mode)
        if mode != "text" and context is None:
            raise ValueError(f"the {mode} mode attends to image tokens: give a context")
        x = self.embeddings(input_ids, mode)
        mask = None if mode == "decoder" else attention_mask
        for layer in self.layers:
            if self.grad_checkpointing and self.training:
                x = checkpoint(layer, x, mode, mask, context, context_mask, use_reentrant=False)
            else:
                x = layer(x, mode, mask, context, context_mask)
        return self.norm(x)

    # ----------------------------------------------------------------- incremental decoding
    def start(self, context: Tensor, max_length: int, context_mask: Tensor | None = None) -> DecoderCache:
        """A decoder-mode cache over ``context`` [batch, context, context_dim]: every layer's cross-attention
        keys/values computed here, once, and empty causal self-attention caches for ``max_length`` tokens."""
        if max_length > self.context_length:
            raise ValueError(f"max_length {max_length} exceeds the context length {self.context_length}")
        cross = [layer.cross_attn.context_kv(context) for layer in self.layers]
        self_kv = DecoderCache.new_self_kv(len(self.layers), context.shape[0], self.num_heads, max_length,
                                           self.dim // self.num_heads, context.device, context.dtype)
        return DecoderCache(self_kv=self_kv, cross_kv=cross, context_mask=context_mask)

    def step(self, input_ids: Tensor, cache: DecoderCache) -> Tensor:
        """Decoder-mode features ``[batch, new, dim]`` of the tokens ``[batch, new]`` after those ``cache``
        holds; their keys/values are appended to it."""
        x = self.embeddings(input_ids, "decoder", cache.length)
        for layer, kv, cross in zip(self.layers, cache.self_kv, cache.cross_kv):
            x = layer(x, "decoder", None, None, cache.context_mask, kv_cache=kv, cross_kv=cross)
        return self.norm(x)
