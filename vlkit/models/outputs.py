"""Typed outputs of the models."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class TwoTowerOutput:
    """What a two-tower model returns for a batch of image-text pairs.

    Attributes:
        image_embeds: L2-normalised image embeddings ``[batch, embed_dim]``.
        text_embeds: L2-normalised text embeddings ``[batch, embed_dim]``.
        logit_scale: the similarity multiplier (``exp`` of the learned log-scale, clamped).
        logit_bias: an additive bias (SigLIP-style models), or None.
        image_embeds_m: momentum-encoder image embeddings (models with momentum queues, training only).
        text_embeds_m: momentum-encoder text embeddings.
    """

    image_embeds: Tensor
    text_embeds: Tensor
    logit_scale: Tensor
    logit_bias: Tensor | None = None
    image_embeds_m: Tensor | None = None
    text_embeds_m: Tensor | None = None

    @property
    def logits_per_image(self) -> Tensor:
        """``[n_images, n_texts]`` scaled cosine similarities."""
        logits = self.logit_scale * self.image_embeds @ self.text_embeds.t()
        return logits if self.logit_bias is None else logits + self.logit_bias
