"""The captioning (language modelling) loss: next-token cross-entropy under teacher forcing."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


@dataclass
class CaptionLossOutput:
    """Attributes:
        loss: mean cross-entropy over the predicted tokens.
        accuracy: share of predicted tokens whose argmax is right (no gradient).
        tokens: how many tokens were predicted.
    """

    loss: Tensor
    accuracy: Tensor
    tokens: int


def caption_labels(input_ids: Tensor, attention_mask: Tensor | None = None, prompt_length: int | Tensor = 0) -> Tensor:
    """The targets of teacher forcing: ``labels[:, t]`` is the token after position ``t`` (``input_ids[:, t + 1]``),
    ``-100`` on padding, on the last position and on the tokens of a prompt prefix (which are given, not predicted).

    Args:
        input_ids: ``[batch, length]``, each row starting with the start token.
        attention_mask: ``[batch, length]`` 1 on tokens, 0 on padding (None: no padding).
        prompt_length: prompt tokens after the start token (an int or ``[batch]``), not scored.

    Returns:
        ``[batch, length]`` long.
    """
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = input_ids[:, 1:]
    if attention_mask is not None:
        real = attention_mask[:, 1:].bool()
        labels[:, :-1] = torch.where(real, labels[:, :-1], IGNORE_INDEX)
    prompt = torch.as_tensor(prompt_length, device=input_ids.device).reshape(-1, 1)  # [batch or 1, 1]
    if bool((prompt > 0).any()):
        position = torch.arange(input_ids.shape[1], device=input_ids.device)[None]  # [1, length]
        labels = torch.where(position < prompt, IGNORE_INDEX, labels)
    return labels


def caption_loss(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> CaptionLossOutput:
    """Cross-entropy of ``logits`` ``[batch, length, vocab]`` against ``labels`` ``[batch, length]`` from
    :func:`caption_labels` (``-100`` ignored), with optional label smoothing."""
    flat_logits, flat_labels = logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1)
    keep = flat_labels != IGNORE_INDEX
    flat_logits, flat_labels = flat_logits[keep], flat_labels[keep]
    if flat_labels.numel() == 0:
        zero = logits.sum() * 0.0
        return CaptionLossOutput(zero, zero.detach(), 0)
    loss = F.cross_entropy(flat_logits, flat_labels, label_smoothing=label_smoothing)
    with torch.no_grad():
        accuracy = (flat_logits.argmax(dim=-1) == flat_labels).float().mean()
    return CaptionLossOutput(loss, accuracy, int(flat_labels.numel()))
