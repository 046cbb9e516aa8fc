"""The contrastive loss over the global batch of all ranks, with gradients that match one process.

Gradient scaling, decided once for this module
----------------------------------------------
:func:`gather_with_grad`'s backward *sums* over ranks: the gradient that reaches a rank's local
input is the gradient of the **sum of all ranks' losses** with respect to that input (each rank's
loss may use the rank's slice through the gather). With that rule no loss needs rescaling:

* ``local_loss=False``: every rank computes the same global loss ``L``. The sum over ranks is
  ``W * L``; rank ``r``'s encoder gradient is ``d(W L)/dx_r · dx_r/dθ``, and DDP's average over the
  ``W`` ranks gives ``(1/W) d(W L)/dθ = dL/dθ``.
* ``local_loss=True``: rank ``r`` computes ``L_r`` from its own rows (images against all texts,
  texts against all images). With equal local batches ``mean_r L_r = L``, so the sum is again
  ``W * L`` and DDP's average is ``dL/dθ``.
* The logit scale (and any parameter used outside the gather) gets ``dL_r/dθ`` on each rank; DDP's
  average is ``d(mean_r L_r)/dθ = dL/dθ`` in both settings.

So a DDP-trained model receives exactly the gradients of one process on the concatenated global
batch. (The other common recipe, gathering without gradient and splicing the local tensor back in,
keeps only ``dL_r/dx_r`` and needs the loss multiplied by ``W`` for the encoders, which then scales
the logit-scale gradient by ``W`` as well.)

Every rank must pass the same local batch size, and every rank must run the backward: the gather's
backward is itself a collective.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from vlkit.modules.losses.contrastive import (
    ContrastiveLoss,
    ContrastiveOutput,
    check_pairs,
    contrastive_loss,
    pair_cross_entropy,
)


def _distributed() -> bool:
    """True when a default process group of more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_gather(x: Tensor) -> Tensor:
    """Concatenates every rank's ``x`` along dim 0, in rank order (no autograd)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums the incoming gradients over ranks and keeps the local slice."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # x: [n, ...] -> [world * n, ...]
        ctx.start, ctx.size = dist.get_rank() * x.shape[0], x.shape[0]
        return _all_gather(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # [world * n, ...] -> [n, ...]
        # An all-reduce, then a slice: a reduce-scatter that every backend (gloo included) supports.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.start : ctx.start + ctx.size]


def gather_with_grad(x: Tensor) -> Tensor:
    """All-gathers ``x`` along dim 0 over the default process group, keeping the gradient path.

    Backward semantics: the gradient returned to rank ``r``'s ``x`` is the sum, over all ranks, of
    the gradient each rank's graph sends to slice ``r`` of its gathered tensor; that is, the gradient
    of the sum of all ranks' losses with respect to this rank's ``x``. All ranks must run the
    backward (it is a collective).

    Args:
        x: this rank's tensor, ``[n, ...]``; the same shape on every rank.

    Returns:
        ``[world * n, ...]`` in rank order; ``x`` itself when not distributed (or world size 1).
    """
    if not _distributed():
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather_no_grad(x: Tensor) -> Tensor:
    """All-gathers ``x`` along dim 0 without autograd; ``x`` itself when not distributed.

    Args:
        x: this rank's tensor, ``[n, ...]``; the same shape on every rank.

    Returns:
        ``[world * n, ...]`` in rank order.
    """
    if not _distributed():
        return x
    return _all_gather(x)


def distributed_contrastive_loss(
    image_embeds: Tensor,
    text_embeds: Tensor,
    logit_scale: Tensor,
    group_ids: Tensor | None = None,
    local_loss: bool = False,
    label_smoothing: float = 0.0,
) -> ContrastiveOutput:
    """The contrastive loss of the global batch, from each rank's local pairs.

    Gradient scaling: none is applied and none is needed. :func:`gather_with_grad` sums the
    gradients of all ranks' losses onto each rank's local embeddings, so after DDP averages the
    parameter gradients over ranks, every parameter has exactly the gradient of single-process
    training on the concatenated global batch, with ``local_loss`` true or false (the module
    docstring derives it). Do not multiply the loss by the world size.

    Args:
        image_embeds: this rank's L2-normalised image embeddings, ``[n, dim]``.
        text_embeds: this rank's L2-normalised text embeddings, ``[n, dim]``, row-aligned pairs.
        logit_scale: the multiplier ``1 / temperature`` (already exponentiated and clamped).
        group_ids: optional group of each local pair, ``[n]`` integers; pairs of one group are
            positives across ranks too (ids must be global, such as dataset image ids).
        local_loss: if false every rank computes the full global loss (``[W n, W n]`` logits);
            if true only this rank's images against all texts and this rank's texts against all
            images (``[n, W n]`` logits twice), whose mean over ranks is the global loss.
        label_smoothing: as in ``F.cross_entropy``.

    Returns:
        A :class:`ContrastiveOutput`. With ``local_loss`` its values are this rank's share and
        ``logits_per_image`` is ``[n, W n]``; average ``loss`` over ranks to log the global loss.
    """
    check_pairs(image_embeds, text_embeds, group_ids)
    all_images = gather_with_grad(image_embeds)  # [W n, dim]
    all_texts = gather_with_grad(text_embeds)  # [W n, dim]
    all_groups = None if group_ids is None else gather_no_grad(group_ids)  # [W n]
    if not local_loss:
        return contrastive_loss(all_images, all_texts, logit_scale, all_groups, label_smoothing)

    n = image_embeds.shape[0]
    offset = dist.get_rank() * n if _distributed() else 0
    logits_per_image = logit_scale * image_embeds @ all_texts.T  # [n, W n]
    logits_per_text = logit_scale * text_embeds @ all_images.T  # [n, W n]
    image_to_text = pair_cross_entropy(logits_per_image, group_ids, all_groups, offset, label_smoothing)
    text_to_image = pair_cross_entropy(logits_per_text, group_ids, all_groups, offset, label_smoothing)
    return ContrastiveOutput(
        loss=(image_to_text + text_to_image) / 2,
        image_to_text=image_to_text,
        text_to_image=text_to_image,
        logits_per_image=logits_per_image,
    )


class DistributedContrastiveLoss(ContrastiveLoss):
    """:func:`distributed_contrastive_loss` with a learned temperature (see :class:`ContrastiveLoss`).

    Args:
        init_temperature: starting temperature (0.07 in CLIP).
        max_logit_scale: upper bound of the multiplier ``1 / temperature``.
        learnable: whether the temperature is trained.
        label_smoothing: as in ``F.cross_entropy``.
        local_loss: compute only this rank's rows against the global batch (see the function).
    """

    def __init__(
        self,
        init_temperature: float = 0.07,
        max_logit_scale: float = 100.0,
        learnable: bool = True,
        label_smoothing: float = 0.0,
        local_loss: bool = False,
    ):
        super().__init__(init_temperature, max_logit_scale, learnable, label_smoothing)
        self.local_loss = local_loss

    def forward(self, image_embeds: Tensor, text_embeds: Tensor, group_ids: Tensor | None = None) -> ContrastiveOutput:
        """See :func:`distributed_contrastive_loss`; local L2-normalised ``[n, dim]`` embeddings in."""
        return distributed_contrastive_loss(
            image_embeds, text_embeds, self.scale(), group_ids, self.local_loss, self.label_smoothing
        )
