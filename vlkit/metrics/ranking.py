"""Metrics of ranking a list of candidates per query with one right answer: Visual Dialog's MRR, recall@K, mean
rank and NDCG.

Each query (a dialog round) scores its candidates (answer options); the right one's rank is 1 plus the
number of candidates scored above it, plus the number scored equal to it that come earlier in the list (ties
go to the earlier option, as a stable sort orders them). NDCG is VisDial's: for a round with dense relevance
scores, ``K`` is the number of options with relevance above zero, the gain of the option at place ``i`` (from
0) of the ranking is its relevance, discounted by ``log2(i + 2)``, summed over the top ``K``, and divided by the
same sum over the options sorted by relevance; rounds without relevance (or with none above zero) are left out.

MRR, recall@K and NDCG are given in percent (times 100), as VisDial leaderboards show them; mean rank as is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

#: the recall cut-offs VisDial reports
RECALL_KS = (1, 5, 10)


@dataclass
class RankingMetrics:
    """Ranking quality over many queries.

    Attributes:
        mrr: mean reciprocal rank of the right answer, times 100.
        r1: share of queries whose right answer is first, percent (likewise ``r5``, ``r10``).
        mean_rank: mean rank of the right answer (1 is best).
        ndcg: mean NDCG over the queries with relevance, times 100; None when no query has relevance.
        num_queries: queries with a right answer (those MRR, recall and mean rank are over).
        num_relevance: queries with relevance (those NDCG is over).
    """

    mrr: float
    r1: float
    r5: float
    r10: float
    mean_rank: float
    ndcg: float | None
    num_queries: int
    num_relevance: int

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """The metrics as ``{prefix + name: value}`` (NDCG only when computed)."""
        out = {f"{prefix}mrr": self.mrr, f"{prefix}r1": self.r1, f"{prefix}r5": self.r5,
               f"{prefix}r10": self.r10, f"{prefix}mean_rank": self.mean_rank}
        if self.ndcg is not None:
            out[f"{prefix}ndcg"] = self.ndcg
        return out


def _padded(scores: Sequence[Tensor]) -> Tensor:
    """``[queries, most candidates]`` float64 scores, padded with -inf."""
    most = max(len(s) for s in scores)
    out = torch.full((len(scores), most), float("-inf"), dtype=torch.float64)
    for i, s in enumerate(scores):
        out[i, : len(s)] = s.detach().double().cpu()
    return out


def answer_ranks(scores: Sequence[Tensor], gt_index: Sequence[int]) -> Tensor:
    """The rank (from 1) of each query's right candidate, ``[queries]`` int64.

    Args:
        scores: per query, ``[candidates]`` scores (higher is better); queries may have different counts.
        gt_index: per query, the position of the right candidate.

    Raises:
        ValueError: the lists differ in length, or a right position is outside its candidates.
    """
    if len(scores) != len(gt_index):
        raise ValueError(f"{len(scores)} score lists for {len(gt_index)} right answers")
    if not scores:
        return torch.zeros(0, dtype=torch.int64)
    for s, g in zip(scores, gt_index):
        if not 0 <= int(g) < len(s):
            raise ValueError(f"right answer {g} outside its {len(s)} candidates")
    padded = _padded(scores)  # [Q, N]
    gt = torch.tensor([int(g) for g in gt_index], dtype=torch.int64)
    right = padded.gather(1, gt[:, None])  # [Q, 1]
    earlier = torch.arange(padded.shape[1])[None, :] < gt[:, None]  # [Q, N]
    above = (padded > right) | ((padded == right) & earlier)
    return 1 + above.sum(dim=1)


def ndcg_visdial(scores: Tensor, relevance: Tensor) -> float | None:
    """VisDial's NDCG of one query (see the module docstring), in [0, 1]; None when no relevance is above 0.

    Args:
        scores: ``[candidates]`` scores.
        relevance: ``[candidates]`` relevance of each candidate (>= 0).
    """
    relevance = relevance.detach().double().cpu()
    k = int((relevance > 0).sum())
    if k == 0:
        return None
    order = torch.sort(scores.detach().double().cpu(), descending=True, stable=True).indices[:k]
    discount = torch.log2(torch.arange(k, dtype=torch.float64) + 2)
    dcg = float((relevance[order] / discount).sum())
    best = float((torch.sort(relevance, descending=True).values[:k] / discount).sum())
    return dcg / best


def ranking_metrics(scores: Sequence[Tensor], gt_index: Sequence[int | None],
                    relevance: Sequence[Tensor | None] | None = None) -> RankingMetrics:
    """MRR, recall@1/5/10, mean rank and (where relevance is given) NDCG of ranked candidates.

    Args:
        scores: per query, ``[candidates]`` scores (higher is better).
        gt_index: per query, the position of the right candidate, or None (such a query counts for NDCG only).
        relevance: per query, ``[candidates]`` relevance or None; None for all when not given.

    Raises:
        ValueError: the lists differ in length, a right position is outside its candidates, or relevance does
            not have one value per candidate.
    """
    relevance = list(relevance) if relevance is not None else [None] * len(scores)
    if not len(scores) == len(gt_index) == len(relevance):
        raise ValueError(f"{len(scores)} score lists, {len(gt_index)} right answers, {len(relevance)} relevances")
    known = [i for i, g in enumerate(gt_index) if g is not None]
    ranks = answer_ranks([scores[i] for i in known], [int(gt_index[i]) for i in known]).double()
    ndcgs = []
    for s, rel in zip(scores, relevance):
        if rel is None:
            continue
        if len(rel) != len(s):
            raise ValueError(f"{len(rel)} relevance values for {len(s)} candidates")
        value = ndcg_visdial(s, rel)
        if value is not None:
            ndcgs.append(value)
    n = len(known)

    def recall(k: int) -> float:
        return 100.0 * float((ranks <= k).sum()) / n if n else float("nan")

    return RankingMetrics(
        mrr=100.0 * float((1.0 / ranks).mean()) if n else float("nan"),
        r1=recall(1), r5=recall(5), r10=recall(10),
        mean_rank=float(ranks.mean()) if n else float("nan"),
        ndcg=100.0 * sum(ndcgs) / len(ndcgs) if ndcgs else None,
        num_queries=n, num_relevance=len(ndcgs))


def chance_mrr(counts: Sequence[int]) -> float:
    """The expected MRR (times 100) of ranking at random, over queries with ``counts`` candidates each: the
    right answer's rank is uniform on ``1..N``, so a query's expected reciprocal rank is ``H_N / N`` (the
    ``N``-th harmonic number over ``N``)."""
    if not counts:
        return float("nan")
    return 100.0 * sum(sum(1.0 / r for r in range(1, n + 1)) / n for n in counts) / len(counts)
