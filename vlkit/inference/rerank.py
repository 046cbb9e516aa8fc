"""Re-ranking retrieval candidates with a model's image-text matching (ITM) head.

ALBEF and BLIP evaluate retrieval in two stages: the contrastive (ITC) embeddings pick the ``k`` best candidates
of every query, then the ITM head, which sees image and text together, re-scores those ``k`` pairs. Here the
``k`` candidates are put in order of their ITM probability alone (``score="itm"``, ALBEF's choice) or of the
ITM probability plus the contrastive similarity mapped to [0, 1] (``score="itm+itc"``, as BLIP adds the two),
ties kept in contrastive order; the candidates beyond ``k`` keep their contrastive order
after them. Both directions are re-ranked: every caption re-ranks its top-k images (text->image) and every
image its top-k captions (image->text).

The metrics read the re-ranked order as a modified similarity matrix: the re-scored pairs are lifted above
every contrastive score (``lift + itm``, ``lift`` larger than any dot product of the embeddings), all other
entries keep their contrastive score. The ranks are then counted blockwise as
:func:`vlkit.metrics.retrieval.retrieval_ranks` counts them (ties optimistic, the matrix never materialised).

Cost: each image's matching features are computed once (one more pass over the split's images: decoding and
the image encoder), one image batch at a time, so memory stays at ``batch_size`` images' features whatever the
split's size; then one fusion pass per scored pair: at most ``k * (captions + images)`` pairs (a pair that is
a candidate in both directions is scored once), in batches of ``pair_batch``.

A fusion-only model (no contrastive embeddings, e.g. ViLT) ranks by ITM over every image-caption pair:
:func:`itm_retrieval` (``images * captions`` fusion passes, refused above ``max_pairs``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor

from vlkit.errors import VlkitError
from vlkit.inference.matching import require_matching
from vlkit.inference.rerank_ranks import DenseScores, DotScores, LiftedScores, metrics_from_ranks, ranks_from_scores
from vlkit.metrics.retrieval import RetrievalMetrics

#: most image-caption pairs :func:`itm_retrieval` scores (every caption against every image)
MAX_ITM_PAIRS = 2_000_000


@torch.no_grad()
def topk_candidates(queries: Tensor, candidates: Tensor, k: int, chunk_size: int = 256) -> tuple[Tensor, Tensor]:
    """The ``k`` candidates of highest dot product for every query, best first.

    Args:
        queries: ``[n_query, dim]``.
        candidates: ``[n_candidate, dim]``.
        k: candidates kept per query (at most ``n_candidate``).
        chunk_size: queries scored at a time (memory ``chunk_size * n_candidate``).

    Returns:
        ``(indices, scores)``, both ``[n_query, k]``.
    """
    k = min(k, candidates.shape[0])
    index, score = [], []
    for q0 in range(0, queries.shape[0], chunk_size):
        sims = queries[q0:q0 + chunk_size].float() @ candidates.float().T  # [chunk, n_candidate]
        top = sims.topk(k, dim=1)
        index.append(top.indices)
        score.append(top.values)
    return torch.cat(index), torch.cat(score)


def order_by_itm(candidates: Tensor, itm: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's candidates sorted by ITM probability, highest first; equal ones keep their given order.

    Args:
        candidates: ``[n_query, k]`` candidate indices in contrastive order.
        itm: ``[n_query, k]`` their ITM probabilities.

    Returns:
        ``(candidates, itm)`` reordered within each row.
    """
    order = torch.sort(itm, dim=1, descending=True, stable=True).indices
    return candidates.gather(1, order), itm.gather(1, order)


@dataclass
class Reranked:
    """Both directions' top-k candidates after re-ranking.

    Attributes:
        k: the candidates re-scored per query.
        t2i: ``[captions, k]`` image indices of each caption, in re-ranked order.
        t2i_itm: ``[captions, k]`` their ITM probabilities.
        i2t: ``[images, k]`` caption indices of each image, in re-ranked order.
        i2t_itm: ``[images, k]`` their ITM probabilities.
        pairs: image-caption pairs scored by the ITM head (each once).
        seconds: time taken by the re-ranking (features and pairs).
        score: what orders the candidates: ``itm`` or ``itm+itc``.
        t2i_score, i2t_score: the values that order them (the ITM probabilities, or those plus the mapped
            contrastive similarity); None: the ITM probabilities.
    """

    k: int
    t2i: Tensor
    t2i_itm: Tensor
    i2t: Tensor
    i2t_itm: Tensor
    pairs: int
    seconds: float = 0.0
    score: str = "itm"
    t2i_score: Tensor | None = None
    i2t_score: Tensor | None = None

    def ranks(self, image_embeds: Tensor, text_embeds: Tensor, text_to_image: Tensor,
              chunk_size: int = 1024) -> tuple[Tensor, Tensor, Tensor]:
        """1-based ranks after re-ranking, as :func:`vlkit.metrics.retrieval.retrieval_ranks` returns them."""
        base = DotScores(image_embeds, text_embeds)
        t2i = self.t2i_itm if self.t2i_score is None else self.t2i_score
        i2t = self.i2t_itm if self.i2t_score is None else self.i2t_score
        return ranks_from_scores(LiftedScores(base, self.t2i, t2i, by_text=True),
                                 LiftedScores(base, self.i2t, i2t, by_text=False),
                                 image_embeds.shape[0], text_to_image, chunk_size)

    def metrics(self, image_embeds: Tensor, text_embeds: Tensor, text_to_image: Tensor,
                chunk_size: int = 1024) -> RetrievalMetrics:
        """Recall@K and ranks of the re-ranked order (the same fields as without re-ranking)."""
        t2i, i2t, _ = self.ranks(image_embeds, text_embeds, text_to_image, chunk_size)
        return metrics_from_ranks(t2i, i2t)


def split_images(loaded, dataset: str | Path, split: str | None, ids: list[str], batch_size: int,
                 num_workers: int = 0) -> Iterator[tuple[int, Tensor]]:
    """The first ``len(ids)`` images of ``split`` as ``(position of the first, images [batch, 3, H, W])``,
    checked against ``ids`` (the rows the embeddings were computed from)."""
    from vlkit.data.dataset import LanceImageTextDataset, make_loader

    ds = LanceImageTextDataset(dataset, split, loaded.model.preprocess.image_transform(train=False), None,
                               captions="none")
    if len(ds) < len(ids):
        raise VlkitError(f"{dataset}: rows changed during the evaluation; run it again")
    start = 0
    for batch in make_loader(ds, batch_size, list(range(len(ids))), num_workers=num_workers):
        if batch["id"] != ids[start:start + len(batch["id"])]:
            raise VlkitError(f"{dataset}: rows changed during the evaluation; run it again")
        yield start, batch["image"]
        start += len(batch["id"])


@torch.no_grad()
def score_pairs(model, images: Iterator[tuple[int, Tensor]], tokens: dict[str, Tensor], image_index: Tensor,
                text_index: Tensor, pair_batch: int = 256, progress=None) -> Tensor:
    """ITM probabilities of the pairs ``(image_index[p], text_index[p])``.

    Args:
        model: a model with the matching interface (:mod:`vlkit.inference.matching`).
        images: ``(start, images)`` batches in order (:func:`split_images`); each image's features are
            computed once, when its batch comes, and dropped after its pairs are scored.
        tokens: ``input_ids`` / ``attention_mask`` ``[captions, length]`` of every caption.
        image_index: ``[pairs]`` image of each pair, ascending.
        text_index: ``[pairs]`` caption of each pair.
        pair_batch: pairs per fusion pass.
        progress: called with the number of pairs scored after each pass.

    Returns:
        ``[pairs]`` float32 probabilities.
    """
    out = torch.full((image_index.shape[0],), float("nan"))
    for start, pixels in images:
        lo = int(torch.searchsorted(image_index, start))
        hi = int(torch.searchsorted(image_index, start + pixels.shape[0]))
        if lo == hi:
            continue
        features = model.match_features(pixels)  # [batch, ...]
        for p0 in range(lo, hi, pair_batch):
            p1 = min(p0 + pair_batch, hi)
            texts = text_index[p0:p1]
            mask = tokens["attention_mask"][texts]
            width = max(1, int(mask.sum(dim=1).max()))  # trailing padding of the whole set is dropped
            ids = tokens["input_ids"][texts][:, :width]
            out[p0:p1] = model.match_scores(features[image_index[p0:p1] - start], ids, mask[:, :width]).float()
            if progress is not None:
                progress(p1 - p0)
    if torch.isnan(out).any():
        raise VlkitError("some pairs were not scored: the images ended before their pairs")
    return out


SCORES = ("itm", "itm+itc")


def rerank_embeddings(loaded, dataset: str | Path, split: str | None, emb, k: int, *, batch_size: int = 64,
                      pair_batch: int = 256, num_workers: int = 0, progress: bool = False,
                      score: str = "itm") -> Reranked:
    """Re-rank both directions' top ``k`` candidates of the embeddings ``emb`` of ``split`` with the ITM head.

    Args:
        loaded: the model (a :class:`~vlkit.inference.loading.LoadedModel`) with a matching head.
        dataset: the dataset ``emb`` was computed from.
        split: its split.
        emb: the split's :class:`~vlkit.inference.embed.Embeddings` (with captions).
        k: candidates re-scored per query.
        batch_size: images per image-encoder pass.
        pair_batch: pairs per fusion pass.
        num_workers: image decoding worker processes.
        progress: show a progress bar.
        score: ``itm`` (order by the ITM probability) or ``itm+itc`` (plus the contrastive similarity, mapped
            from [-1, 1] to [0, 1]).

    Raises:
        VlkitError: the model has no matching head, ``k`` is below 1, or an unknown ``score``.
    """
    if k < 1:
        raise VlkitError(f"--rerank must be at least 1, got {k}")
    if score not in SCORES:
        raise VlkitError(f"unknown re-ranking score {score!r}; choose {' or '.join(SCORES)}")
    model = require_matching(loaded.model)
    start = time.perf_counter()
    n_img, n_txt = emb.image.shape[0], emb.text.shape[0]
    t2i, t2i_sim = topk_candidates(emb.text, emb.image, k)  # [n_txt, k_t2i]
    i2t, i2t_sim = topk_candidates(emb.image, emb.text, k)  # [n_img, k_i2t]
    keys = torch.cat([t2i.flatten() * n_txt + torch.arange(n_txt).repeat_interleave(t2i.shape[1]),
                      torch.arange(n_img).repeat_interleave(i2t.shape[1]) * n_txt + i2t.flatten()])
    unique, inverse = torch.unique(keys, sorted=True, return_inverse=True)  # sorted by image, then caption
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(unique), desc="rerank", unit="pair", dynamic_ncols=True)
    try:
        scores = score_pairs(model, split_images(loaded, dataset, split, emb.ids, batch_size, num_workers),
                             loaded.tokenizer(emb.captions), unique // n_txt, unique % n_txt, pair_batch,
                             bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    per_pair = scores[inverse]
    t2i_itm = per_pair[: t2i.numel()].view_as(t2i)
    i2t_itm = per_pair[t2i.numel():].view_as(i2t)
    if score == "itm":
        t2i, t2i_itm = order_by_itm(t2i, t2i_itm)
        i2t, i2t_itm = order_by_itm(i2t, i2t_itm)
        return Reranked(k, t2i, t2i_itm, i2t, i2t_itm, len(unique), time.perf_counter() - start)
    t2i_score = t2i_itm + (t2i_sim.float().clamp(-1, 1) + 1) / 2  # both in [0, 1]: the sum in [0, 2]
    i2t_score = i2t_itm + (i2t_sim.float().clamp(-1, 1) + 1) / 2
    by_t = torch.sort(t2i_score, dim=1, descending=True, stable=True).indices
    by_i = torch.sort(i2t_score, dim=1, descending=True, stable=True).indices
    pick = lambda t, order: t.gather(1, order)  # noqa: E731
    return Reranked(k, pick(t2i, by_t), pick(t2i_itm, by_t), pick(i2t, by_i), pick(i2t_itm, by_i), len(unique),
                    time.perf_counter() - start, score, pick(t2i_score, by_t), pick(i2t_score, by_i))


def split_captions(dataset: str | Path, split: str | None, limit: int | None = None
                   ) -> tuple[list[str], list[str], Tensor]:
    """The image ids, the captions and each caption's image position of the first ``limit`` rows of ``split``
    (in the order :class:`~vlkit.data.dataset.LanceImageTextDataset` reads them)."""
    from vlkit.data.store import open_dataset, split_indices

    ds = open_dataset(dataset)
    rows = ds.take(split_indices(ds, split)[:limit], columns=["id", "captions"]).to_pydict()
    captions, owner = [], []
    for i, caps in enumerate(rows["captions"]):
        captions += caps or []
        owner += [i] * len(caps or [])
    return rows["id"], captions, torch.tensor(owner, dtype=torch.long)


def itm_pairs_error(images: int, captions: int, max_pairs: int = MAX_ITM_PAIRS) -> str | None:
    """Why ITM retrieval over ``images * captions`` pairs is refused (None: it is not)."""
    pairs = images * captions
    if pairs <= max_pairs:
        return None
    return (f"retrieval by a fusion-only model scores every caption against every image: {images} images x "
            f"{captions} captions = {pairs:,} pairs, above the bound of {max_pairs:,}; evaluate fewer images "
            f"with --limit N (e.g. --limit {max(1, int((max_pairs * images / captions) ** 0.5))})")


@dataclass
class ITMRetrieval:
    """Retrieval scored by ITM over every pair.

    Attributes:
        metrics: recall@K and ranks.
        scores: ``[images, captions]`` ITM probabilities.
        ids: the image ids.
        captions: the caption strings.
        caption_image: ``[captions]`` each caption's image position.
        seconds: time taken.
    """

    metrics: RetrievalMetrics
    scores: Tensor
    ids: list[str]
    captions: list[str]
    caption_image: Tensor
    seconds: float


def itm_retrieval(loaded, dataset: str | Path, split: str | None, *, limit: int | None = None,
                  batch_size: int = 64, pair_batch: int = 256, num_workers: int = 0, progress: bool = False,
                  max_pairs: int = MAX_ITM_PAIRS) -> ITMRetrieval:
    """Retrieval metrics of a fusion-only model: every caption scored against every image by the ITM head.

    The cost is ``images * captions`` fusion passes (the images encoded once each); refused above
    ``max_pairs``.

    Raises:
        VlkitError: the model has no matching head, or there are more than ``max_pairs`` pairs.
    """
    model = require_matching(loaded.model, "retrieval without contrastive embeddings")
    start = time.perf_counter()
    ids, captions, owner = split_captions(dataset, split, limit)
    error = itm_pairs_error(len(ids), len(captions), max_pairs)
    if error:
        raise VlkitError(error)
    n_img, n_txt = len(ids), len(captions)
    image_index = torch.arange(n_img).repeat_interleave(n_txt)
    text_index = torch.arange(n_txt).repeat(n_img)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_img * n_txt, desc="itm", unit="pair", dynamic_ncols=True)
    try:
        scores = score_pairs(model, split_images(loaded, dataset, split, ids, batch_size, num_workers),
                             loaded.tokenizer(captions), image_index, text_index, pair_batch,
                             bar.update if bar is not None else None).view(n_img, n_txt)
    finally:
        if bar is not None:
            bar.close()
    matrix = DenseScores(scores)
    t2i, i2t, _ = ranks_from_scores(matrix, matrix, n_img, owner)
    return ITMRetrieval(metrics_from_ranks(t2i, i2t), scores, ids, captions, owner, time.perf_counter() - start)
