"""The symmetric image-text contrastive loss (InfoNCE, as trained in CLIP, Radford et al. 2021).

A batch holds ``n`` image-text pairs; row ``i`` of the image embeddings and row ``i`` of the text
embeddings belong together. Each image must pick its caption among all captions of the batch, and
each caption its image, through a softmax over temperature-scaled cosine similarities.

With ``group_ids`` several pairs may share one group (several captions of one image in a batch): all
members of a row's group are positives and the target distribution is uniform over them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class ContrastiveOutput:
    """What the contrastive loss returns.

    Attributes:
        loss: mean of ``image_to_text`` and ``text_to_image``; a scalar.
        image_to_text: cross-entropy of each image over the captions, averaged over images.
        text_to_image: cross-entropy of each caption over the images, averaged over captions.
        logits_per_image: the scaled similarities the image-to-text term used, ``[n_img, n_txt]``.
    """

    loss: Tensor
    image_to_text: Tensor
    text_to_image: Tensor
    logits_per_image: Tensor  # [n_img, n_txt]


def check_pairs(image_embeds: Tensor, text_embeds: Tensor, group_ids: Tensor | None) -> None:
    """Raises ``ValueError`` unless the inputs are ``[batch, dim]`` pairs and ``[batch]`` group ids."""
    if image_embeds.dim() != 2 or text_embeds.dim() != 2:
        raise ValueError(
            f"embeddings must be [batch, dim]; got image {tuple(image_embeds.shape)}, text {tuple(text_embeds.shape)}"
        )
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(
            f"image and text embeddings must be row-aligned pairs of one width; "
            f"got {tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}"
        )
    if group_ids is not None and group_ids.shape != image_embeds.shape[:1]:
        raise ValueError(f"group_ids must be [batch] = [{image_embeds.shape[0]}], got {tuple(group_ids.shape)}")


def pair_cross_entropy(
    logits: Tensor,
    row_groups: Tensor | None = None,
    col_groups: Tensor | None = None,
    offset: int = 0,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Mean cross-entropy of each row of ``logits`` against its positives among the columns.

    Without groups, row ``i`` has the single positive column ``offset + i`` (hard targets, exactly
    ``F.cross_entropy(logits, arange + offset)``). With groups, the positives of row ``i`` are the
    columns ``j`` with ``col_groups[j] == row_groups[i]`` and the target is uniform over them.

    Args:
        logits: scaled similarities, ``[rows, cols]``.
        row_groups: group id of each row, ``[rows]``; give both groups or neither.
        col_groups: group id of each column, ``[cols]``.
        offset: column of row 0's positive when no groups are given (a rank's slice of a global batch).
        label_smoothing: mixes the target with a uniform distribution over all columns.

    Returns:
        The mean over rows, a scalar.
    """
    if row_groups is None or col_groups is None:
        if row_groups is not None or col_groups is not None:
            raise ValueError("give both row_groups and col_groups, or neither")
        labels = torch.arange(logits.shape[0], device=logits.device) + offset  # [rows]
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    positives = (row_groups[:, None] == col_groups[None, :]).to(logits.dtype)  # [rows, cols]
    # Every row needs a positive (true when the columns include the rows' own pairs); a row
    # without one would get an all-zero target, so its term would vanish. Not checked here to
    # avoid a host-device sync each step.
    targets = positives / positives.sum(dim=1, keepdim=True).clamp(min=1)  # [rows, cols], rows sum to 1
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)


def contrastive_loss(
    image_embeds: Tensor,
    text_embeds: Tensor,
    logit_scale: Tensor,
    group_ids: Tensor | None = None,
    label_smoothing: float = 0.0,
) -> ContrastiveOutput:
    """The symmetric contrastive loss of a batch of image-text pairs.

    Args:
        image_embeds: L2-normalised image embeddings, ``[batch, dim]``.
        text_embeds: L2-normalised text embeddings, ``[batch, dim]``; row ``i`` pairs with image ``i``.
        logit_scale: the multiplier of the cosine similarities (``1 / temperature``, already
            exponentiated and clamped), a scalar tensor.
        group_ids: optional group of each pair, ``[batch]`` integers (for example the image id):
            every pair of the same group counts as a positive, with uniform soft targets.
            Without it the diagonal is the only positive.
        label_smoothing: as in ``F.cross_entropy``.

    Returns:
        A :class:`ContrastiveOutput`; ``loss`` is the mean of the image-to-text (rows) and
        text-to-image (columns) cross-entropies.
    """
    check_pairs(image_embeds, text_embeds, group_ids)
    logits_per_image = logit_scale * image_embeds @ text_embeds.T  # [n_img, n_txt]
    image_to_text = pair_cross_entropy(logits_per_image, group_ids, group_ids, 0, label_smoothing)
    text_to_image = pair_cross_entropy(logits_per_image.T, group_ids, group_ids, 0, label_smoothing)
    return ContrastiveOutput(
        loss=(image_to_text + text_to_image) / 2,
        image_to_text=image_to_text,
        text_to_image=text_to_image,
        logits_per_image=logits_per_image,
    )


class LearnableLogitScale(nn.Module):
    """Holds a temperature as ``logit_scale = log(1 / temperature)``, the parametrisation of CLIP.

    Args:
        init_temperature: starting temperature (0.07 in CLIP).
        max_logit_scale: upper bound of the multiplier ``exp(logit_scale)`` (100 in CLIP).
        learnable: a trained ``nn.Parameter`` if true, else a fixed buffer.
    """

    def __init__(self, init_temperature: float = 0.07, max_logit_scale: float = 100.0, learnable: bool = True):
        super().__init__()
        if not init_temperature > 0:
            raise ValueError(f"init_temperature must be positive, got {init_temperature}")
        if not max_logit_scale >= 1.0:
            raise ValueError(f"max_logit_scale must be at least 1, got {max_logit_scale}")
        self.max_logit_scale = float(max_logit_scale)
        value = torch.tensor(math.log(1.0 / init_temperature))
        if learnable:
            self.logit_scale = nn.Parameter(value)
        else:
            self.register_buffer("logit_scale", value)

    def scale(self) -> Tensor:
        """The multiplier ``exp(logit_scale)``, clamped to at most ``max_logit_scale``; a scalar."""
        return self.logit_scale.exp().clamp(max=self.max_logit_scale)

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamps the raw ``logit_scale`` in place to ``[0, log(max_logit_scale)]``.

        Call after each optimizer step, as CLIP does, so the stored value never drifts beyond the
        range where :meth:`scale` passes gradients.
        """
        self.logit_scale.clamp_(0.0, math.log(self.max_logit_scale))


class ContrastiveLoss(LearnableLogitScale):
    """:func:`contrastive_loss` with a learned temperature.

    Args:
        init_temperature: starting temperature (0.07 in CLIP).
        max_logit_scale: upper bound of the multiplier ``1 / temperature``.
        learnable: whether the temperature is trained.
        label_smoothing: as in ``F.cross_entropy``.
    """

    def __init__(
        self,
        init_temperature: float = 0.07,
        max_logit_scale: float = 100.0,
        learnable: bool = True,
        label_smoothing: float = 0.0,
    ):
        super().__init__(init_temperature, max_logit_scale, learnable)
        self.label_smoothing = label_smoothing

    def forward(self, image_embeds: Tensor, text_embeds: Tensor, group_ids: Tensor | None = None) -> ContrastiveOutput:
        """See :func:`contrastive_loss`; embeddings are L2-normalised ``[batch, dim]``."""
        return contrastive_loss(image_embeds, text_embeds, self.scale(), group_ids, self.label_smoothing)
