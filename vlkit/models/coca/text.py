"""CoCa's unimodal text tower: CLIP's causal text transformer with a learned [CLS] embedding appended after the
tokens, whose output is the contrastive text feature; the token outputs feed the multimodal decoder."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from vlkit.modules.encoders.text_transformer import TextConfig, TextTransformer
from vlkit.modules.layers.attention import KVCache


class CoCaTextEncoder(TextTransformer):
    """Token ids ``[batch, length]`` to a [CLS] feature ``[batch, width]`` and token features.

    The [CLS] embedding is appended after the last token (after the padding too) and always takes the position
    embedding ``context_length`` (the row after the text's), so its feature does not depend on how far a batch is
    padded. Text tokens attend causally, so they never see the [CLS] token and a decoder can step through them
    without it.

    Args:
        config: the sizes; ``context_length`` counts the text tokens (the [CLS] takes one more position).
        legacy_cls_mask: the [CLS] mask of open_clip's released CoCa weights (``correct_cls_mask=False``): shifted
            by one position, so the [CLS] token sees the first padding token and not itself (unless the text
            fills the whole context). Texts are padded to ``context_length`` to reproduce it exactly. False: the
            [CLS] token sees the real tokens and itself.
    """

    def __init__(self, config: TextConfig, legacy_cls_mask: bool = False):
        super().__init__(config)
        self.legacy_cls_mask = legacy_cls_mask
        self.pos_embed = nn.Parameter(torch.randn(config.context_length + 1, config.width) * 0.01)
        self.cls_emb = nn.Parameter(torch.randn(config.width) * 0.01)

    def embed(self, input_ids: Tensor, positions: Tensor | None = None) -> Tensor:
        """Token plus position embeddings ``[batch, length, width]`` (positions default to ``0 .. length-1``)."""
        length = input_ids.shape[1]
        if positions is None:
            if length > self.config.context_length:
                raise ValueError(f"{length} tokens exceed the context length {self.config.context_length}")
            positions = torch.arange(length, device=input_ids.device)
        elif int(positions[-1]) >= self.config.context_length:
            raise ValueError(f"position {int(positions[-1])} is past the context length {self.config.context_length}")
        return self.token_embedding(input_ids) + self.pos_embed[positions]

    def forward_tokens(self, input_ids: Tensor) -> Tensor:
        """Token features ``[batch, length, width]`` (before ``ln_final``, as the decoder reads them), without
        the [CLS] token."""
        return self.transformer(self.embed(input_ids), is_causal=True)

    def step(self, input_ids: Tensor, kv_caches: Sequence[KVCache]) -> Tensor:
        """Token features of ``input_ids`` ``[batch, new]`` following the tokens the caches hold."""
        start = kv_caches[0].length
        positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
        return self.transformer(self.embed(input_ids, positions), is_causal=True, kv_caches=kv_caches)

    def cls_mask(self, real: Tensor) -> Tensor:
        """Boolean attention mask ``[batch, length + 1, length + 1]`` (True = attend) for tokens followed by the
        [CLS] token: causal for the tokens; the [CLS] row sees the real tokens (``real`` [batch, length]) and
        itself, or open_clip's shifted legacy row."""
        batch, length = real.shape
        mask = torch.ones(length + 1, length + 1, dtype=torch.bool, device=real.device).tril()
        mask = mask[None].repeat(batch, 1, 1)  # [batch, length + 1, length + 1]
        ones = torch.ones(batch, 1, dtype=torch.bool, device=real.device)
        mask[:, length] = torch.cat([ones, real] if self.legacy_cls_mask else [real, ones], dim=1)
        return mask

    def forward_with_cls(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The [CLS] feature after ``ln_final`` ``[batch, width]`` and the token features ``[batch, length,
        width]`` (before ``ln_final``), from one pass.

        Args:
            attention_mask: ``[batch, length]`` 1 on real tokens (None: tokens other than ``pad_token_id``).
        """
        batch, length = input_ids.shape
        real = (input_ids != self.config.pad_token_id) if attention_mask is None else attention_mask.bool()
        context = self.config.context_length
        if self.legacy_cls_mask and length < context:  # open_clip pads every text to the full context
            fill = input_ids.new_full((batch, context - length), self.config.pad_token_id)
            input_ids = torch.cat([input_ids, fill], dim=1)
            real = torch.cat([real, torch.zeros_like(fill, dtype=torch.bool)], dim=1)
        x = self.embed(input_ids)  # [batch, L, width]
        cls = (self.cls_emb + self.pos_embed[context]).to(x.dtype)[None, None].expand(batch, 1, -1)
        x = self.transformer(torch.cat([x, cls], dim=1), attn_mask=self.cls_mask(real))  # [batch, L + 1, width]
        return self.ln_final(x[:, -1]), x[:, :length]

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """The [CLS] feature ``[batch, width]`` (after ``ln_final``, before any projection)."""
        return self.forward_with_cls(input_ids, attention_mask)[0]
