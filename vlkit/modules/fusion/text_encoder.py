"""A BERT-style text encoder on vlkit's pre-norm layers: word + learned position embeddings, bidirectional
self-attention with a padding mask, a final LayerNorm; the first token ([CLS]) pools."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vlkit.modules.layers.transformer import Transformer, TransformerEncoderLayer


class TextEmbeddings(nn.Module):
    """Token ids to ``word + position`` embeddings.

    Args:
        vocab_size: number of token ids.
        dim: embedding width.
        context_length: most positions.
    """

    def __init__(self, vocab_size: int, dim: int, context_length: int):
        super().__init__()
        self.word_embed = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Parameter(torch.randn(context_length, dim) * 0.02)
        self.context_length = context_length
        nn.init.normal_(self.word_embed.weight, std=0.02)

    def forward(self, input_ids: Tensor) -> Tensor:
        """``[batch, length]`` ids -> ``[batch, length, dim]``."""
        length = input_ids.shape[1]
        if length > self.context_length:
            raise ValueError(f"{length} tokens exceed the context length {self.context_length}")
        return self.word_embed(input_ids) + self.pos_embed[:length]  # [batch, length, dim]


class BidirectionalTextEncoder(nn.Module):
    """Embeddings, ``layers`` pre-norm encoder layers (not causal, padding masked) and a final LayerNorm.

    Args:
        vocab_size: number of token ids.
        dim: width.
        layers: encoder layers.
        num_heads: attention heads.
        context_length: most tokens.
        mlp_ratio: MLP hidden width / dim.
        act: MLP activation.
        norm_eps: LayerNorm epsilon.
        dropout: dropout on the residual branches.
    """

    def __init__(self, vocab_size: int, dim: int, layers: int, num_heads: int, context_length: int,
                 mlp_ratio: float = 4.0, act: str = "gelu", norm_eps: float = 1e-6, dropout: float = 0.0):
        super().__init__()
        self.embed = TextEmbeddings(vocab_size, dim, context_length)
        self.transformer = Transformer([TransformerEncoderLayer(dim, num_heads, mlp_ratio, act, norm_eps, dropout)
                                        for _ in range(layers)])
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.width = dim

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.embed.word_embed

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Token features ``[batch, length, dim]``; ``attention_mask`` [batch, length] is 1 on real tokens."""
        x = self.transformer(self.embed(input_ids), key_padding_mask=attention_mask)
        return self.norm(x)
