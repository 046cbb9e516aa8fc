"""The CLIP text transformer: causal self-attention, pooled at the end-of-text token."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vlkit.modules.layers.transformer import Transformer, TransformerEncoderLayer


@dataclass
class TextConfig:
    """Sizes of a :class:`TextTransformer`."""

    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0
    act: str = "quick_gelu"
    norm_eps: float = 1e-5
    eos_token_id: int | None = None  # None: pool at the highest token id (CLIP's end-of-text is the largest)
    pad_token_id: int = 0


class TextTransformer(nn.Module):
    """Token ids ``[batch, length]`` to a pooled feature ``[batch, width]`` (before any projection).

    Attention is causal, so padding after the end-of-text token cannot change the pooled feature and no
    padding mask is needed (which keeps the fused causal attention kernel).

    Args:
        config: the sizes.
    """

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        w = config.width
        self.token_embedding = nn.Embedding(config.vocab_size, w)
        self.pos_embed = nn.Parameter(torch.randn(config.context_length, w) * 0.01)
        self.transformer = Transformer(
            [TransformerEncoderLayer(w, config.heads, config.mlp_ratio, config.act, config.norm_eps)
             for _ in range(config.layers)]
        )
        self.ln_final = nn.LayerNorm(w, eps=config.norm_eps)
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    @property
    def width(self) -> int:
        return self.config.width

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.layers

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def _embed(self, input_ids: Tensor) -> Tensor:
        length = input_ids.shape[1]
        if length > self.config.context_length:
            raise ValueError(f"{length} tokens exceed the context length {self.config.context_length}")
        return self.token_embedding(input_ids) + self.pos_embed[:length]  # [batch, length, width]

    def forward_features(self, input_ids: Tensor) -> Tensor:
        """Token features ``[batch, length, width]`` after ``ln_final``."""
        return self.ln_final(self.transformer(self._embed(input_ids), is_causal=True))

    def eos_positions(self, input_ids: Tensor) -> Tensor:
        """Index of the end-of-text token of each sequence ``[batch]``."""
        if self.config.eos_token_id is None:
            return input_ids.argmax(dim=-1)
        return (input_ids == self.config.eos_token_id).int().argmax(dim=-1)

    def pool(self, tokens: Tensor, input_ids: Tensor) -> Tensor:
        return tokens[torch.arange(tokens.shape[0], device=tokens.device), self.eos_positions(input_ids)]

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Pooled feature ``[batch, width]`` at the end-of-text tokens.

        Only what the pooled feature depends on is computed: attention is causal, so positions after the
        batch's last end-of-text token are cut off (on CPU, where finding that position costs no device
        synchronisation), and the last block runs for the end-of-text tokens only. ``attention_mask`` is
        accepted for a uniform interface and not needed.
        """
        eos = self.eos_positions(input_ids)
        if input_ids.device.type == "cpu" and not torch.jit.is_tracing() and not torch.compiler.is_compiling():
            input_ids = input_ids[:, : int(eos.max()) + 1]
        x = self.transformer(self._embed(input_ids), is_causal=True, output_index=eos)
        return self.ln_final(x[:, 0])  # [batch, width]
