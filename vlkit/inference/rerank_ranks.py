"""Retrieval ranks from any image x caption score, counted blockwise.

:func:`ranks_from_scores` follows the protocol of :mod:`vlkit.metrics.retrieval` (a caption's rank is one plus
the images that score strictly higher than its own; an image's rank is one plus the captions of other images
that score strictly higher than its best caption) for scores given as blocks, so that a re-ranked order
(:class:`LiftedScores`: the re-scored candidates lifted above the contrastive scores) or a dense ITM matrix
(:class:`DenseScores`) is scored by the same counting. Each direction may read its own score.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from vlkit.metrics.retrieval import RECALL_KS, RetrievalMetrics


class Scores(Protocol):
    """An image x caption score, read by blocks and by pairs (float64)."""

    def block(self, i0: int, i1: int, t0: int, t1: int) -> Tensor: ...  # [i1 - i0, t1 - t0]

    def pairs(self, image_index: Tensor, text_index: Tensor) -> Tensor: ...  # [pairs]


class DotScores:
    """Dot products of image and caption embeddings (computed in float32, as the retrieval metrics do)."""

    def __init__(self, image_embeds: Tensor, text_embeds: Tensor):
        self.image, self.text = image_embeds, text_embeds

    def block(self, i0: int, i1: int, t0: int, t1: int) -> Tensor:
        return (self.image[i0:i1].float() @ self.text[t0:t1].float().T).double()  # [ci, ct]

    def pairs(self, image_index: Tensor, text_index: Tensor) -> Tensor:
        return (self.image[image_index].float() * self.text[text_index].float()).sum(dim=1).double()

    def bound(self) -> float:
        """An upper bound of every dot product (Cauchy-Schwarz)."""
        return float(self.image.float().norm(dim=1).max() * self.text.float().norm(dim=1).max())


class DenseScores:
    """A materialised ``[images, captions]`` score matrix."""

    def __init__(self, matrix: Tensor):
        self.matrix = matrix

    def block(self, i0: int, i1: int, t0: int, t1: int) -> Tensor:
        return self.matrix[i0:i1, t0:t1].double()

    def pairs(self, image_index: Tensor, text_index: Tensor) -> Tensor:
        return self.matrix[image_index, text_index].double()


class LiftedScores:
    """Contrastive scores with each query's re-scored candidates lifted above all of them.

    Args:
        base: the contrastive scores.
        candidates: ``[queries, k]`` candidate indices per query: images per caption (``by_text``) or
            captions per image.
        itm: ``[queries, k]`` their ITM probabilities; a candidate's score becomes ``lift + itm``, with
            ``lift = 1 + base.bound()``, above every contrastive score.
        by_text: whether the queries are the captions (text->image) or the images (image->text).
    """

    def __init__(self, base: DotScores, candidates: Tensor, itm: Tensor, by_text: bool):
        self.base, self.candidates, self.itm, self.by_text = base, candidates, itm.double(), by_text
        self.lift = 1.0 + base.bound()

    def block(self, i0: int, i1: int, t0: int, t1: int) -> Tensor:
        out = self.base.block(i0, i1, t0, t1)  # [ci, ct]
        if self.by_text:
            cand, itm, lo, hi = self.candidates[t0:t1], self.itm[t0:t1], i0, i1  # [ct, k]
        else:
            cand, itm, lo, hi = self.candidates[i0:i1], self.itm[i0:i1], t0, t1  # [ci, k]
        inside = (cand >= lo) & (cand < hi)
        query = torch.arange(cand.shape[0]).unsqueeze(1).expand_as(cand)[inside]
        other = cand[inside] - lo
        rows, cols = (other, query) if self.by_text else (query, other)
        out[rows, cols] = self.lift + itm[inside]
        return out

    def pairs(self, image_index: Tensor, text_index: Tensor) -> Tensor:
        out = self.base.pairs(image_index, text_index)
        query, other = (text_index, image_index) if self.by_text else (image_index, text_index)
        match = self.candidates[query] == other.unsqueeze(1)  # [pairs, k]
        hit = match.any(dim=1)
        out[hit] = self.lift + (self.itm[query] * match).sum(dim=1)[hit]
        return out


@torch.no_grad()
def ranks_from_scores(t2i_scores: Scores, i2t_scores: Scores, n_img: int, text_to_image: Tensor,
                      chunk_size: int = 1024) -> tuple[Tensor, Tensor, Tensor]:
    """1-based ranks both ways, as :func:`vlkit.metrics.retrieval.retrieval_ranks` counts them, of scores read
    blockwise (text->image ranks from ``t2i_scores``, image->text ranks from ``i2t_scores``).

    Args:
        t2i_scores: the score every caption ranks the images by.
        i2t_scores: the score every image ranks the captions by.
        n_img: the number of images.
        text_to_image: ``[captions]`` each caption's image.
        chunk_size: images and captions per block.

    Returns:
        ``(t2i_ranks, i2t_ranks, i2t_images)`` as :func:`~vlkit.metrics.retrieval.retrieval_ranks` returns them.
    """
    t2i = text_to_image.long()
    n_txt = t2i.shape[0]
    texts = torch.arange(n_txt)
    pos = t2i_scores.pairs(t2i, texts)  # [n_txt]: each caption with its own image
    own = i2t_scores.pairs(t2i, texts)
    best = torch.full((n_img,), float("-inf"), dtype=torch.float64)
    best.scatter_reduce_(0, t2i, own, reduce="amax", include_self=True)
    t2i_higher = torch.zeros(n_txt, dtype=torch.long)
    i2t_higher = torch.zeros(n_img, dtype=torch.long)
    for i0 in range(0, n_img, chunk_size):
        i1 = min(i0 + chunk_size, n_img)
        image_ids = torch.arange(i0, i1).unsqueeze(1)  # [ci, 1]
        for t0 in range(0, n_txt, chunk_size):
            t1 = min(t0 + chunk_size, n_txt)
            negative = image_ids != t2i[t0:t1].unsqueeze(0)  # [ci, ct]
            t2i_higher[t0:t1] += ((t2i_scores.block(i0, i1, t0, t1) > pos[t0:t1].unsqueeze(0)) & negative).sum(0)
            i2t_higher[i0:i1] += ((i2t_scores.block(i0, i1, t0, t1) > best[i0:i1].unsqueeze(1)) & negative).sum(1)
    i2t_images = (torch.bincount(t2i, minlength=n_img) > 0).nonzero().squeeze(1)
    return t2i_higher + 1, i2t_higher[i2t_images] + 1, i2t_images


def _summary(ranks: Tensor) -> tuple[list[float], float, float]:
    n = ranks.numel()
    recalls = [100.0 * int((ranks <= k).sum()) / n for k in RECALL_KS]
    ordered, mid = ranks.sort().values, n // 2
    median = float(ordered[mid]) if n % 2 else (int(ordered[mid - 1]) + int(ordered[mid])) / 2
    return recalls, int(ranks.sum()) / n, median


def metrics_from_ranks(t2i_ranks: Tensor, i2t_ranks: Tensor) -> RetrievalMetrics:
    """:class:`~vlkit.metrics.retrieval.RetrievalMetrics` of given 1-based ranks."""
    (t1, t5, t10), t_mean, t_median = _summary(t2i_ranks.cpu())
    (i1, i5, i10), i_mean, i_median = _summary(i2t_ranks.cpu())
    return RetrievalMetrics(t2i_r1=t1, t2i_r5=t5, t2i_r10=t10, i2t_r1=i1, i2t_r5=i5, i2t_r10=i10,
                            t2i_mean_rank=t_mean, t2i_median_rank=t_median, i2t_mean_rank=i_mean,
                            i2t_median_rank=i_median, rsum=t1 + t5 + t10 + i1 + i5 + i10)
