"""The pairwise sigmoid loss of SigLIP (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training").

Every image-text combination of the batch is an independent binary problem, positive for the pairs
of the batch and negative otherwise, so no softmax over the batch is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlkit.modules.losses.contrastive import LearnableLogitScale, check_pairs


@dataclass
class SiglipOutput:
    """What the sigmoid loss returns.

    Attributes:
        loss: ``-sum(logsigmoid(labels * logits)) / batch``, a scalar.
        logits: ``scale * img @ txt.T + bias``, ``[n_img, n_txt]``.
    """

    loss: Tensor
    logits: Tensor  # [n_img, n_txt]


def siglip_loss(
    image_embeds: Tensor,
    text_embeds: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor,
    group_ids: Tensor | None = None,
) -> SiglipOutput:
    """The SigLIP sigmoid loss of a batch of image-text pairs.

    Args:
        image_embeds: L2-normalised image embeddings, ``[batch, dim]``.
        text_embeds: L2-normalised text embeddings, ``[batch, dim]``; row ``i`` pairs with image ``i``.
        logit_scale: the multiplier of the similarities (already exponentiated), a scalar tensor.
        logit_bias: added to every logit (``-10`` at the start in the paper), a scalar tensor.
        group_ids: optional group of each pair, ``[batch]``; pairs of one group are all positives.
            Without it only the diagonal is positive.

    Returns:
        A :class:`SiglipOutput`; labels are ``+1`` on positives and ``-1`` elsewhere, and the loss is
        summed over all ``batch x batch`` combinations and divided by ``batch``.
    """
    check_pairs(image_embeds, text_embeds, group_ids)
    n = image_embeds.shape[0]
    logits = logit_scale * image_embeds @ text_embeds.T + logit_bias  # [n_img, n_txt]
    if group_ids is None:
        positives = torch.eye(n, dtype=torch.bool, device=logits.device)  # [n, n]
    else:
        positives = group_ids[:, None] == group_ids[None, :]  # [n, n]
    labels = positives.to(logits.dtype) * 2 - 1  # [n, n], +1 / -1
    loss = -F.logsigmoid(labels * logits).sum() / n
    return SiglipOutput(loss=loss, logits=logits)


class SiglipLoss(LearnableLogitScale):
    """:func:`siglip_loss` with a learned scale and bias.

    ``logit_scale`` starts at ``log 10`` (temperature 0.1) and ``logit_bias`` at ``-10``, the
    initialisation of the paper, which keeps the many negatives from dominating the first steps.

    Args:
        init_logit_scale: starting multiplier (10 in the paper); stored as its log.
        init_logit_bias: starting bias.
        max_logit_scale: upper bound of the multiplier.
    """

    def __init__(self, init_logit_scale: float = 10.0, init_logit_bias: float = -10.0, max_logit_scale: float = 100.0):
        if not init_logit_scale > 0:
            raise ValueError(f"init_logit_scale must be positive, got {init_logit_scale}")
        super().__init__(init_temperature=1.0 / init_logit_scale, max_logit_scale=max_logit_scale, learnable=True)
        self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias)))

    def forward(self, image_embeds: Tensor, text_embeds: Tensor, group_ids: Tensor | None = None) -> SiglipOutput:
        """See :func:`siglip_loss`; embeddings are L2-normalised ``[batch, dim]``."""
        return siglip_loss(image_embeds, text_embeds, self.scale(), self.logit_bias, group_ids)
