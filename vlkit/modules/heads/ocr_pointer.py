"""A pointer over OCR tokens: copying an answer from the words read in the image (as M4C and LoRRA do).

The OCR tokens are appended to the question as text, so the fusion encoder sees them beside the question and
the image. The pointer scores every OCR token as the answer from the fused features: a query projected from the
pooled ([CLS]) feature meets a key projected from the fused feature of the token's first sub-word,

    score_k = (W_q h_cls) . (W_k h_{pos_k}) / sqrt(dim)

and the answer head's output is the answer-vocabulary logits followed by these ``K`` scores. Slots without a
token (padding, or a token cut off by the text length) score :data:`NO_TOKEN`, low enough that their sigmoid is
0 and their binary cross-entropy against a zero target is 0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

#: the score of an OCR slot that holds no token
NO_TOKEN = -1e4


class OCRPointer(nn.Module):
    """Scores of OCR token positions as answers.

    Args:
        width: width of the fused features.
        dim: width of the query and key projections (default: ``width``).

    Example:
        >>> pointer = OCRPointer(64)
        >>> pointer(cls, tokens, positions).shape  # cls [2, 64], tokens [2, 20, 64], positions [2, 5]
        torch.Size([2, 5])
    """

    def __init__(self, width: int, dim: int | None = None):
        super().__init__()
        self.dim = dim or width
        self.query = nn.Linear(width, self.dim)
        self.key = nn.Linear(width, self.dim)

    def forward(self, pooled: Tensor, tokens: Tensor, positions: Tensor) -> Tensor:
        """Scores ``[batch, K]`` of the OCR tokens.

        Args:
            pooled: ``[batch, width]`` the feature the answer head reads (the fused [CLS]).
            tokens: ``[batch, L, width]`` fused text-token features.
            positions: ``[batch, K]`` int64, where in ``tokens`` each OCR token starts; -1 for no token.

        Returns:
            ``[batch, K]`` scores; :data:`NO_TOKEN` where ``positions`` is -1.
        """
        present = positions >= 0  # [batch, K]
        index = positions.clamp(0, tokens.shape[1] - 1)
        picked = tokens.gather(1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))  # [batch, K, width]
        q = self.query(pooled)  # [batch, dim]
        k = self.key(picked)  # [batch, K, dim]
        scores = torch.einsum("bd,bkd->bk", q, k) / math.sqrt(self.dim)  # [batch, K]
        return scores.masked_fill(~present, NO_TOKEN)
