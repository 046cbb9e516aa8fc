"""CoCa's multimodal text decoder: per layer a causal self-attention block and a cross-attention block to the
image context (each with its own MLP), then a final LayerNorm and the projection to the vocabulary."""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vlkit.modules.layers.attention import KVCache
from vlkit.modules.layers.cross_attention_block import CrossAttentionBlock
from vlkit.modules.layers.transformer import TransformerEncoderLayer


class MultimodalDecoder(nn.Module):
    """Text token features ``[batch, length, width]`` and image context ``[batch, tokens, context_dim]`` to
    next-token logits ``[batch, length, vocab_size]``.

    Args:
        width: token width.
        layers: number of (self-attention, cross-attention) layer pairs.
        heads: attention heads of both blocks.
        context_dim: width of the image context.
        vocab_size: size of the logits.
        mlp_ratio: MLP hidden width / width.
        act: MLP activation.
        norm_eps: LayerNorm epsilon.
    """

    def __init__(self, width: int, layers: int, heads: int, context_dim: int, vocab_size: int,
                 mlp_ratio: float = 4.0, act: str = "gelu", norm_eps: float = 1e-5):
        super().__init__()
        self.width, self.heads = width, heads
        self.layers = nn.ModuleList(
            [TransformerEncoderLayer(width, heads, mlp_ratio, act, norm_eps) for _ in range(layers)])
        self.cross_layers = nn.ModuleList(
            [CrossAttentionBlock(width, heads, context_dim, mlp_ratio, act, norm_eps) for _ in range(layers)])
        self.ln_final = nn.LayerNorm(width, eps=norm_eps)
        self.lm_head = nn.Linear(width, vocab_size, bias=False)
        nn.init.normal_(self.lm_head.weight, std=width**-0.5)
        self.grad_checkpointing = False

    def context_kv(self, context: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Each cross-attention layer's keys and values of ``context`` (once per image when decoding)."""
        return [block.context_kv(context) for block in self.cross_layers]

    def forward(self, x: Tensor, context: Tensor | None = None, cross_kv: Sequence[tuple[Tensor, Tensor]] | None = None,
                kv_caches: Sequence[KVCache] | None = None, context_mask: Tensor | None = None) -> Tensor:
        """Logits ``[batch, length, vocab_size]`` of ``x`` [batch, length, width].

        Args:
            context: image context ``[batch, tokens, context_dim]`` (or its ``cross_kv``).
            cross_kv: keys/values of the context per layer from :meth:`context_kv`.
            kv_caches: self-attention caches per layer (incremental decoding; ``x`` follows what they hold).
            context_mask: ``[batch, tokens]`` True on real context tokens (None: all real).
        """
        for i, (self_block, cross_block) in enumerate(zip(self.layers, self.cross_layers)):
            cache = kv_caches[i] if kv_caches is not None else None
            kv = cross_kv[i] if cross_kv is not None else None
            if self.grad_checkpointing and self.training and cache is None:
                x = checkpoint(self_block, x, None, None, True, use_reentrant=False)
                x = checkpoint(cross_block, x, context, context_mask, kv, use_reentrant=False)
            else:
                x = self_block(x, is_causal=True, kv_cache=cache)
                x = cross_block(x, context, context_padding_mask=context_mask, cross_kv=kv)
        return self.lm_head(self.ln_final(x))  # [batch, length, vocab_size]
