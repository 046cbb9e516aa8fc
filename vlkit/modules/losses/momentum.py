"""Momentum encoders and feature queues for contrastive learning (MoCo, He et al. 2020; ALBEF,
Li et al. 2021; BriVL, Huo et al. 2021).

A slowly moving copy of the encoders (an exponential moving average of the online weights) embeds
each batch a second time; those momentum embeddings are pushed into first-in-first-out queues, and
the online embeddings are contrasted against the momentum embeddings of the batch plus every queued
one. The number of negatives is then the queue size, independent of the batch size.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlkit.modules.losses.contrastive import LearnableLogitScale, check_pairs
from vlkit.modules.losses.distributed import gather_no_grad


class FeatureQueue(nn.Module):
    """A ring buffer of the ``size`` most recently enqueued feature rows.

    ``features`` starts as random unit vectors (as in MoCo and ALBEF); ``ptr`` is the row the next
    write starts at, and ``filled`` counts the rows written so far (at most ``size``). Enqueueing
    overwrites the oldest rows, so there is no separate dequeue. All three are buffers, so they
    travel with ``state_dict`` and ``.to(device)``.

    Args:
        dim: feature width.
        size: number of rows kept.
    """

    def __init__(self, dim: int, size: int):
        super().__init__()
        if dim < 1 or size < 1:
            raise ValueError(f"queue dim and size must be positive, got dim={dim}, size={size}")
        self.dim, self.size = dim, size
        self.register_buffer("features", F.normalize(torch.randn(size, dim), dim=1))  # [size, dim]
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, features: Tensor) -> None:
        """Writes a batch of rows at ``ptr``, wrapping around and overwriting the oldest rows.

        When a process group is running, the batches of all ranks are gathered first (in rank
        order), so every rank holds the same queue. Any batch size works; a batch larger than the
        queue leaves only its newest (last) ``size`` rows. Runs without host-device syncs.

        Args:
            features: rows to add, ``[batch, dim]`` (detached here).
        """
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ValueError(f"queue expects [batch, {self.dim}] features, got {tuple(features.shape)}")
        features = gather_no_grad(features.detach()).to(self.features.dtype)  # [world * batch, dim]
        total = features.shape[0]
        if total == 0:
            return
        kept = min(total, self.size)
        skipped = total - kept  # oldest rows of an oversized batch, overwritten at once anyway
        steps = torch.arange(kept, device=self.features.device)  # [kept]
        rows = (self.ptr + skipped + steps) % self.size  # [kept], distinct
        self.features.index_copy_(0, rows, features[skipped:])
        self.ptr.copy_((self.ptr + total) % self.size)
        self.filled.copy_((self.filled + total).clamp(max=self.size))

    def features_view(self, filled_only: bool = False) -> Tensor:
        """The queue contents, detached and copied.

        A copy, so that enqueueing after the loss is computed (but before its backward) does not
        change the values the backward needs.

        Args:
            filled_only: return only the rows written so far (fewer than ``size`` until the queue
                has wrapped once) instead of all rows, random initial ones included.

        Returns:
            ``[size, dim]`` (or ``[filled, dim]``) in storage order, not age order.
        """
        if filled_only:
            return self.features[: int(self.filled)].detach().clone()  # [filled, dim]
        return self.features.detach().clone()  # [size, dim]

    def chronological(self) -> Tensor:
        """The written rows from oldest to newest, ``[filled, dim]`` (detached copy)."""
        if int(self.filled) < self.size:
            return self.features[: int(self.filled)].detach().clone()
        return torch.roll(self.features.detach(), shifts=-int(self.ptr), dims=0)  # [size, dim]


@torch.no_grad()
def momentum_update(online: nn.Module, target: nn.Module, momentum: float) -> None:
    """Moves ``target``'s parameters towards ``online``'s: ``t <- momentum * t + (1 - momentum) * o``.

    Buffers (batch-norm statistics and the like) are copied as they are. After ``k`` updates with
    fixed online weights, ``t_k = o + momentum**k * (t_0 - o)``.

    Args:
        online: the trained module.
        target: its momentum copy, of the same structure (see :func:`make_momentum_copy`).
        momentum: in ``[0, 1]``; ``0`` copies, ``1`` freezes. ALBEF uses 0.995.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    online_params, target_params = dict(online.named_parameters()), dict(target.named_parameters())
    online_buffers, target_buffers = dict(online.named_buffers()), dict(target.named_buffers())
    if online_params.keys() != target_params.keys() or online_buffers.keys() != target_buffers.keys():
        raise ValueError("online and momentum modules differ in structure; build the target with make_momentum_copy")
    for name, t in target_params.items():
        t.lerp_(online_params[name].detach(), 1.0 - momentum)
    for name, b in target_buffers.items():
        b.copy_(online_buffers[name])


def make_momentum_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters do not require gradients, to be moved by
    :func:`momentum_update`."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@dataclass
class MomentumContrastiveOutput:
    """What the queue contrastive loss returns.

    Attributes:
        loss: mean of the two directions, a scalar.
        image_to_text: cross-entropy of online images over [momentum texts of the batch; text queue].
        text_to_image: cross-entropy of online texts over [momentum images of the batch; image queue].
    """

    loss: Tensor
    image_to_text: Tensor
    text_to_image: Tensor


def queue_contrastive_loss(
    image_embeds: Tensor,
    text_embeds: Tensor,
    image_embeds_m: Tensor,
    text_embeds_m: Tensor,
    image_queue: Tensor,
    text_queue: Tensor,
    logit_scale: Tensor,
) -> MomentumContrastiveOutput:
    """Contrasts online embeddings against momentum embeddings of the batch and the queues.

    Image ``i`` is scored against ``[text_embeds_m; text_queue]``, with its positive at column ``i``
    (its own caption's momentum embedding); every other batch row and every queue row is a negative.
    Texts are scored the same way against the images. No gradient flows into the momentum
    embeddings or the queues.

    Args:
        image_embeds: online L2-normalised image embeddings, ``[batch, dim]``.
        text_embeds: online L2-normalised text embeddings, ``[batch, dim]``.
        image_embeds_m: momentum image embeddings of the same batch, ``[batch, dim]``.
        text_embeds_m: momentum text embeddings of the same batch, ``[batch, dim]``.
        image_queue: queued momentum image embeddings, ``[queue, dim]`` (``queue`` may be 0).
        text_queue: queued momentum text embeddings, ``[queue, dim]``.
        logit_scale: the multiplier ``1 / temperature`` (already exponentiated and clamped).

    Returns:
        A :class:`MomentumContrastiveOutput`.
    """
    check_pairs(image_embeds, text_embeds, None)
    check_pairs(image_embeds_m, text_embeds_m, None)
    if image_embeds_m.shape != image_embeds.shape:
        raise ValueError(f"momentum embeddings {tuple(image_embeds_m.shape)} differ from {tuple(image_embeds.shape)}")
    dim = image_embeds.shape[1]
    if image_queue.dim() != 2 or text_queue.dim() != 2 or image_queue.shape[1] != dim or text_queue.shape[1] != dim:
        raise ValueError(f"queues must be [queue, {dim}], got {tuple(image_queue.shape)} and {tuple(text_queue.shape)}")
    all_texts = torch.cat([text_embeds_m, text_queue.to(text_embeds_m.dtype)]).detach()  # [batch + queue, dim]
    all_images = torch.cat([image_embeds_m, image_queue.to(image_embeds_m.dtype)]).detach()  # [batch + queue, dim]
    labels = torch.arange(image_embeds.shape[0], device=image_embeds.device)  # [batch]
    image_to_text = F.cross_entropy(logit_scale * image_embeds @ all_texts.T, labels)  # logits [batch, batch + queue]
    text_to_image = F.cross_entropy(logit_scale * text_embeds @ all_images.T, labels)  # logits [batch, batch + queue]
    return MomentumContrastiveOutput(
        loss=(image_to_text + text_to_image) / 2, image_to_text=image_to_text, text_to_image=text_to_image
    )


class MomentumContrastiveLoss(LearnableLogitScale):
    """:func:`queue_contrastive_loss` with its two queues and a learned temperature.

    Each call computes the loss against the current queues, then enqueues the batch's momentum
    embeddings (gathered over ranks when distributed), so a batch never meets its own queued copy.

    Early steps: with ``filled_only=False`` (MoCo, ALBEF) the queues' random unit-vector rows act as
    negatives until they are overwritten, so every step sees ``batch + queue_size`` candidates. With
    ``filled_only=True`` only rows already written are used: the first step is a plain in-batch loss
    against the momentum embeddings, and the candidates grow to ``batch + queue_size`` once the
    queue has filled.

    Args:
        dim: embedding width.
        queue_size: rows per queue (negatives beyond the batch).
        init_temperature: starting temperature.
        max_logit_scale: upper bound of the multiplier ``1 / temperature``.
        filled_only: use only written queue rows (see above).
    """

    def __init__(
        self,
        dim: int,
        queue_size: int = 4096,
        init_temperature: float = 0.07,
        max_logit_scale: float = 100.0,
        filled_only: bool = False,
    ):
        super().__init__(init_temperature, max_logit_scale, learnable=True)
        self.image_queue = FeatureQueue(dim, queue_size)
        self.text_queue = FeatureQueue(dim, queue_size)
        self.filled_only = filled_only

    def forward(
        self, image_embeds: Tensor, text_embeds: Tensor, image_embeds_m: Tensor, text_embeds_m: Tensor
    ) -> MomentumContrastiveOutput:
        """Loss of online ``[batch, dim]`` embeddings against momentum ones and the queues; then enqueues."""
        out = queue_contrastive_loss(
            image_embeds,
            text_embeds,
            image_embeds_m,
            text_embeds_m,
            self.image_queue.features_view(self.filled_only),
            self.text_queue.features_view(self.filled_only),
            self.scale(),
        )
        self.image_queue.enqueue(image_embeds_m)
        self.text_queue.enqueue(text_embeds_m)
        return out
