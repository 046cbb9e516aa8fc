"""Image-text matching (ITM): a binary head on the fused [CLS] token, and the mining of negative pairs.

ALBEF (Li et al. 2021) mines *hard* negatives: for each image, a text of the batch drawn with probability
proportional to the softmax of the contrastive similarity (so captions that nearly match are drawn most often),
and for each text an image the same way; pairs of the same group (the image's own captions) are never drawn.
ViLT (Kim et al. 2021) draws negatives uniformly from the other pairs of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ITMHead(nn.Module):
    """A linear map of the fused [CLS] feature to two logits: ``[not matched, matched]``.

    Args:
        dim: width of the fused feature.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.fc = nn.Linear(dim, 2)

    def forward(self, cls: Tensor) -> Tensor:
        """``[batch, dim]`` -> ``[batch, 2]``."""
        return self.fc(cls)


@dataclass
class HardNegatives:
    """Indices of the sampled negatives.

    Attributes:
        text_index: for each image ``i``, the batch row of its negative text, ``[n_images]``.
        image_index: for each text ``j``, the batch row of its negative image, ``[n_texts]``.
    """

    text_index: Tensor
    image_index: Tensor


def _positives(n_rows: int, n_cols: int, row_groups: Tensor | None, col_groups: Tensor | None,
               device: torch.device) -> Tensor:
    """``[rows, cols]`` True where row and column are of one group (the diagonal when no groups are given)."""
    if row_groups is None or col_groups is None:
        return torch.eye(n_rows, n_cols, dtype=torch.bool, device=device)
    return row_groups[:, None] == col_groups[None, :]


def _sample_rows(logits: Tensor, positives: Tensor, generator: torch.Generator | None) -> Tensor:
    """One column per row, with probability ``softmax(logits)`` restricted to the non-positive columns."""
    if not bool((~positives).any(dim=1).all()):
        raise ValueError("every row needs at least one negative: a batch where all pairs share one group "
                         "has none to draw")
    probs = logits.detach().float().masked_fill(positives, float("-inf")).softmax(dim=1)  # [rows, cols]
    return torch.multinomial(probs, 1, generator=generator)[:, 0]  # [rows]


def hard_negatives(sim_i2t: Tensor, sim_t2i: Tensor, group_ids: Tensor | None = None,
                   generator: torch.Generator | None = None) -> HardNegatives:
    """Draw one hard negative text per image and one hard negative image per text (ALBEF's mining).

    Args:
        sim_i2t: image-to-text similarity logits, ``[n_images, n_texts]`` (scaled, as in the contrastive loss).
        sim_t2i: text-to-image similarity logits, ``[n_texts, n_images]``.
        group_ids: group of each pair, ``[batch]`` (pairs of one group are positives of each other and are
            never drawn); None: only the diagonal is positive.
        generator: random generator for the draw (on the device of the logits).

    Returns:
        :class:`HardNegatives`; nothing flows back through the indices.

    Raises:
        ValueError: a row without any negative (all pairs of one group).
    """
    pos_i2t = _positives(sim_i2t.shape[0], sim_i2t.shape[1], group_ids, group_ids, sim_i2t.device)
    pos_t2i = _positives(sim_t2i.shape[0], sim_t2i.shape[1], group_ids, group_ids, sim_t2i.device)
    return HardNegatives(text_index=_sample_rows(sim_i2t, pos_i2t, generator),
                         image_index=_sample_rows(sim_t2i, pos_t2i, generator))


def random_negatives(batch: int, group_ids: Tensor | None = None, generator: torch.Generator | None = None,
                     device: torch.device | None = None) -> Tensor:
    """For each pair, a uniformly drawn other row of another group (ViLT's negatives), ``[batch]``."""
    if group_ids is not None:
        device = group_ids.device
    positives = _positives(batch, batch, group_ids, group_ids, device or torch.device("cpu"))
    return _sample_rows(torch.zeros(batch, batch, device=positives.device), positives, generator)


@dataclass
class ITMOutput:
    """What :func:`itm_loss` returns.

    Attributes:
        loss: mean cross-entropy over all pairs, a scalar.
        accuracy: fraction of pairs classified right, a scalar (no gradient).
        logits: ``[positives + negatives, 2]``.
        labels: ``[positives + negatives]``, 1 for matched pairs.
    """

    loss: Tensor
    accuracy: Tensor
    logits: Tensor
    labels: Tensor


def itm_loss(pos_logits: Tensor, neg_logits: Tensor) -> ITMOutput:
    """Binary cross-entropy (as a two-class softmax) of matched and unmatched pairs.

    Args:
        pos_logits: ITM logits of the matched pairs, ``[n_pos, 2]``.
        neg_logits: ITM logits of the negative pairs, ``[n_neg, 2]``.
    """
    logits = torch.cat([pos_logits, neg_logits])  # [n_pos + n_neg, 2]
    labels = torch.cat([torch.ones(pos_logits.shape[0], dtype=torch.long, device=logits.device),
                        torch.zeros(neg_logits.shape[0], dtype=torch.long, device=logits.device)])
    loss = F.cross_entropy(logits.float(), labels)
    accuracy = (logits.detach().argmax(dim=1) == labels).float().mean()
    return ITMOutput(loss=loss, accuracy=accuracy, logits=logits, labels=labels)
