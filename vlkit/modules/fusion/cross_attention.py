"""The fusion encoder of ALBEF-style models: text tokens attend to each other (bidirectionally) and to the
image tokens, layer after layer."""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vlkit.modules.layers.transformer import TransformerDecoderLayer


class FusionLayer(TransformerDecoderLayer):
    """Pre-norm self-attention over the text tokens (padding masked, not causal), cross-attention from the
    text tokens to the image tokens, MLP:

        x = x + self_attn(ln_1(x));  x = x + cross_attn(ln_cross(x), image);  x = x + mlp(ln_2(x))

    The layer is :class:`~vlkit.modules.layers.transformer.TransformerDecoderLayer` run without the causal
    mask, so the text side is encoded bidirectionally.

    Args:
        dim: text width.
        num_heads: attention heads.
        context_dim: width of the image tokens (default ``dim``).
        mlp_ratio: MLP hidden width / dim.
        act: MLP activation.
        norm_eps: LayerNorm epsilon.
    """

    def forward(  # type: ignore[override]
        self, x: Tensor, context: Tensor, key_padding_mask: Tensor | None = None,
        context_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Fuse text tokens ``x`` [batch, length, dim] with ``context`` [batch, tokens, context_dim].

        Args:
            key_padding_mask: ``[batch, length]``, True (or 1) on real text tokens.
            context_padding_mask: ``[batch, tokens]``, True on real context tokens (None: all are real).

        Returns:
            ``[batch, length, dim]``.
        """
        return super().forward(x, context, key_padding_mask=key_padding_mask,
                               context_padding_mask=context_padding_mask, is_causal=False)


class FusionEncoder(nn.Module):
    """A stack of :class:`FusionLayer` with a final LayerNorm (the layers are pre-norm).

    Args:
        layers: the fusion layers, applied in order.
        dim: their width (for the final norm).
        norm_eps: LayerNorm epsilon.
    """

    def __init__(self, layers: Sequence[FusionLayer], dim: int, norm_eps: float = 1e-6):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.grad_checkpointing = False

    @classmethod
    def build(cls, dim: int, layers: int, num_heads: int, context_dim: int | None = None, mlp_ratio: float = 4.0,
              act: str = "gelu", norm_eps: float = 1e-6) -> "FusionEncoder":
        """``layers`` identical :class:`FusionLayer` of the given sizes."""
        return cls([FusionLayer(dim, num_heads, context_dim, mlp_ratio, act, norm_eps) for _ in range(layers)],
                   dim, norm_eps)

    def forward(self, text: Tensor, image: Tensor, attention_mask: Tensor | None = None,
                image_mask: Tensor | None = None) -> Tensor:
        """Text tokens ``[batch, length, dim]`` fused with image tokens ``[batch, tokens, context_dim]``.

        Args:
            attention_mask: ``[batch, length]``, 1 on real text tokens, 0 on padding.
            image_mask: ``[batch, tokens]``, 1 on real image tokens (None: all).

        Returns:
            ``[batch, length, dim]`` after the final norm.
        """
        x = text
        for layer in self.layers:
            if self.grad_checkpointing and self.training:
                x = checkpoint(layer, x, image, attention_mask, image_mask, use_reentrant=False)
            else:
                x = layer(x, image, attention_mask, image_mask)
        return self.norm(x)  # [batch, length, dim]
