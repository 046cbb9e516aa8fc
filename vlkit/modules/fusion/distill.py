"""Momentum distillation (ALBEF, Li et al. 2021): a slowly moving (EMA) teacher's predictions are mixed
into the training targets, so that captions which describe an image well but are not its own caption
(or plausible words other than the masked one) are not punished as hard negatives:

    loss = (1 - alpha) * CE(logits, hard targets) + alpha * CE(logits, softmax(teacher logits))

Cross-entropy is linear in the target, so this is the cross-entropy against the mixed target
``(1 - alpha) * hard + alpha * teacher``; ALBEF uses ``alpha = 0.4``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def soft_cross_entropy(logits: Tensor, target_probs: Tensor) -> Tensor:
    """Mean over rows of ``-sum_c target[c] * log_softmax(logits)[c]``.

    Args:
        logits: ``[rows, classes]``.
        target_probs: ``[rows, classes]``, each row a distribution (no gradient is taken through it).
    """
    return -(target_probs.detach() * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


def distilled_cross_entropy(logits: Tensor, targets: Tensor, teacher_logits: Tensor | None = None,
                            alpha: float = 0.0) -> Tensor:
    """``(1 - alpha) * CE(logits, targets) + alpha * soft_CE(logits, softmax(teacher_logits))``.

    Args:
        logits: student logits, ``[rows, classes]``.
        targets: class indices ``[rows]`` or target distributions ``[rows, classes]``.
        teacher_logits: teacher logits ``[rows, classes]`` (e.g. of a momentum model); None: no distillation.
        alpha: weight of the teacher's distribution, in ``[0, 1]``.

    Returns:
        A scalar, the mean over rows.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    logits = logits.float()
    hard = F.cross_entropy(logits, targets.float() if targets.is_floating_point() else targets)
    if teacher_logits is None or alpha == 0.0:
        return hard
    soft = soft_cross_entropy(logits, teacher_logits.detach().float().softmax(dim=-1))
    return (1.0 - alpha) * hard + alpha * soft


@dataclass
class ITCOutput:
    """What :func:`momentum_itc_loss` returns.

    Attributes:
        loss: mean of the two directions, a scalar.
        image_to_text: loss of the images over ``[momentum texts of the batch; text queue]``.
        text_to_image: loss of the texts over ``[momentum images of the batch; image queue]``.
        logits_per_image: student image-to-text logits ``[batch, batch + queue]`` (in-batch columns first).
        logits_per_text: student text-to-image logits ``[batch, batch + queue]``.
    """

    loss: Tensor
    image_to_text: Tensor
    text_to_image: Tensor
    logits_per_image: Tensor
    logits_per_text: Tensor


def _hard_targets(batch: int, queue: int, group_ids: Tensor | None, device: torch.device) -> Tensor:
    """``[batch, batch + queue]``: uniform over the in-batch positives (same group, or the diagonal)."""
    if group_ids is None:
        pos = torch.eye(batch, device=device)
    else:
        pos = (group_ids[:, None] == group_ids[None, :]).float()
    pos = torch.cat([pos, torch.zeros(batch, queue, device=device)], dim=1)
    return pos / pos.sum(dim=1, keepdim=True)


def momentum_itc_loss(
    image_embeds: Tensor,
    text_embeds: Tensor,
    image_embeds_m: Tensor,
    text_embeds_m: Tensor,
    image_queue: Tensor,
    text_queue: Tensor,
    logit_scale: Tensor,
    alpha: float = 0.4,
    group_ids: Tensor | None = None,
) -> ITCOutput:
    """ALBEF's image-text contrastive loss with momentum features, queues and momentum distillation.

    Online image ``i`` is scored against ``[text_embeds_m; text_queue]``; its hard target is its own pair
    (uniform over the pairs of its group when ``group_ids`` is given; queued rows are negatives), its soft
    target the teacher's softmax of ``image_embeds_m[i]`` against the same candidates. Texts likewise.

    With ``alpha = 0``, an empty queue and momentum embeddings equal to the online ones, this is the plain
    contrastive loss (:func:`vlkit.modules.losses.contrastive_loss`).

    Args:
        image_embeds: online L2-normalised image embeddings, ``[batch, dim]``.
        text_embeds: online L2-normalised text embeddings, ``[batch, dim]``.
        image_embeds_m: momentum image embeddings of the batch, ``[batch, dim]``.
        text_embeds_m: momentum text embeddings of the batch, ``[batch, dim]``.
        image_queue: queued momentum image embeddings, ``[queue, dim]`` (``queue`` may be 0).
        text_queue: queued momentum text embeddings, ``[queue, dim]``.
        logit_scale: multiplier ``1 / temperature`` (exponentiated and clamped); the teacher uses it
            without gradient.
        alpha: distillation weight.
        group_ids: group of each pair, ``[batch]``.

    Returns:
        An :class:`ITCOutput`.
    """
    batch = image_embeds.shape[0]
    all_texts = torch.cat([text_embeds_m, text_queue.to(text_embeds_m.dtype)]).detach()  # [batch + queue, dim]
    all_images = torch.cat([image_embeds_m, image_queue.to(image_embeds_m.dtype)]).detach()  # [batch + queue, dim]
    sim_i2t = logit_scale * image_embeds @ all_texts.T  # [batch, batch + queue]
    sim_t2i = logit_scale * text_embeds @ all_images.T  # [batch, batch + queue]
    targets = _hard_targets(batch, all_texts.shape[0] - batch, group_ids, image_embeds.device)
    teacher_i2t = teacher_t2i = None
    if alpha > 0:
        with torch.no_grad():
            scale = logit_scale.detach()
            teacher_i2t = scale * image_embeds_m.detach() @ all_texts.T  # [batch, batch + queue]
            teacher_t2i = scale * text_embeds_m.detach() @ all_images.T
    image_to_text = distilled_cross_entropy(sim_i2t, targets, teacher_i2t, alpha)
    text_to_image = distilled_cross_entropy(sim_t2i, targets, teacher_t2i, alpha)
    return ITCOutput(loss=(image_to_text + text_to_image) / 2, image_to_text=image_to_text,
                     text_to_image=text_to_image, logits_per_image=sim_i2t, logits_per_text=sim_t2i)
