"""Image-text retrieval metrics (recall@k, mean and median rank) with several captions per image.

The protocol is the usual one for COCO / Flickr30k style evaluation:

* **Text to image** (``t2i``): every caption is a query; exactly one image (the one it describes) is
  correct. Its rank is ``1 + the number of images that score strictly higher than the correct image``.
* **Image to text** (``i2t``): every image that has at least one caption is a query; it is correct at
  rank ``r`` if *any* of its captions is among the top ``r`` texts. Its rank is therefore
  ``1 + the number of texts that score strictly higher than the image's best-scoring caption``.

Ties are counted optimistically: a candidate with exactly the same score as the correct one does not
push it down. Scores are dot products of the given embeddings (they are assumed to be L2-normalised
already; nothing is normalised here), computed in float32.

Images without any caption are still candidates (distractors) for text-to-image retrieval, but are not
image-to-text queries, since they have no correct answer.

Memory stays bounded for very large sets (e.g. 100k images x 500k captions): the similarity matrix is
never materialised. Blocks of ``chunk_size`` images x ``chunk_size`` texts are scored one at a time, and
each block updates both directions' counters, so the extra memory is ``O(chunk_size**2 + n_img + n_txt)``
and the work is one pass of ``n_img * n_txt`` dot products.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from vlkit.errors import VlkitError

RECALL_KS = (1, 5, 10)


@dataclass
class RetrievalMetrics:
    """Retrieval results in both directions.

    Attributes:
        t2i_r1: Text-to-image recall@1, in percent (0-100).
        t2i_r5: Text-to-image recall@5, in percent.
        t2i_r10: Text-to-image recall@10, in percent.
        i2t_r1: Image-to-text recall@1, in percent.
        i2t_r5: Image-to-text recall@5, in percent.
        i2t_r10: Image-to-text recall@10, in percent.
        t2i_mean_rank: Mean 1-based rank of the correct image over all caption queries.
        t2i_median_rank: Median 1-based rank of the correct image (mean of the two middle ranks when
            the number of queries is even).
        i2t_mean_rank: Mean 1-based rank of each image's best caption over all image queries.
        i2t_median_rank: Median 1-based rank of each image's best caption.
        rsum: Sum of the six recalls (0-600).
    """

    t2i_r1: float
    t2i_r5: float
    t2i_r10: float
    i2t_r1: float
    i2t_r5: float
    i2t_r10: float
    t2i_mean_rank: float
    t2i_median_rank: float
    i2t_mean_rank: float
    i2t_median_rank: float
    rsum: float

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """The fields as a flat dict, each key prefixed with ``prefix``.

        Args:
            prefix: Prepended verbatim to every field name, e.g. ``"val/coco/"`` gives
                ``"val/coco/t2i_r1"``.

        Returns:
            ``{prefix + field_name: value}`` in field order.
        """
        return {f"{prefix}{k}": v for k, v in asdict(self).items()}


def _check_inputs(image_embeds: Tensor, text_embeds: Tensor, text_to_image: Tensor, chunk_size: int) -> None:
    if not isinstance(image_embeds, Tensor) or not isinstance(text_embeds, Tensor):
        raise VlkitError("retrieval metrics: image_embeds and text_embeds must be torch tensors")
    if not isinstance(text_to_image, Tensor):
        raise VlkitError("retrieval metrics: text_to_image must be a torch tensor of image indices")
    if image_embeds.dim() != 2 or text_embeds.dim() != 2:
        raise VlkitError(
            f"retrieval metrics: embeddings must be 2-D [n, dim]; got image_embeds {tuple(image_embeds.shape)} "
            f"and text_embeds {tuple(text_embeds.shape)}"
        )
    if image_embeds.shape[1] != text_embeds.shape[1]:
        raise VlkitError(
            f"retrieval metrics: embedding sizes disagree: images have dim {image_embeds.shape[1]}, "
            f"texts have dim {text_embeds.shape[1]}"
        )
    if not image_embeds.is_floating_point() or not text_embeds.is_floating_point():
        raise VlkitError(
            f"retrieval metrics: embeddings must be floating point; got {image_embeds.dtype} and {text_embeds.dtype}"
        )
    if image_embeds.device != text_embeds.device:
        raise VlkitError(
            f"retrieval metrics: image_embeds are on {image_embeds.device} but text_embeds are on {text_embeds.device}"
        )
    n_img, n_txt = image_embeds.shape[0], text_embeds.shape[0]
    if n_img == 0 or n_txt == 0:
        raise VlkitError(f"retrieval metrics: need at least one image and one text; got {n_img} and {n_txt}")
    if text_to_image.dim() != 1 or text_to_image.shape[0] != n_txt:
        raise VlkitError(
            f"retrieval metrics: text_to_image must have shape [{n_txt}] (one image index per text); "
            f"got {tuple(text_to_image.shape)}"
        )
    if text_to_image.is_floating_point() or text_to_image.is_complex() or text_to_image.dtype == torch.bool:
        raise VlkitError(f"retrieval metrics: text_to_image must hold integer indices; got {text_to_image.dtype}")
    lo, hi = int(text_to_image.min()), int(text_to_image.max())
    if lo < 0 or hi >= n_img:
        bad = lo if lo < 0 else hi
        raise VlkitError(
            f"retrieval metrics: text_to_image holds image index {bad}, outside [0, {n_img - 1}] "
            f"for {n_img} images"
        )
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise VlkitError(f"retrieval metrics: chunk_size must be a positive integer; got {chunk_size!r}")


def _check_finite(embeds: Tensor, name: str, chunk_size: int) -> None:
    for start in range(0, embeds.shape[0], chunk_size):
        block = embeds[start : start + chunk_size]
        if not bool(torch.isfinite(block).all()):
            row = start + int((~torch.isfinite(block)).any(dim=1).nonzero()[0, 0])
            raise VlkitError(f"retrieval metrics: {name} row {row} holds NaN or infinity")


@torch.no_grad()
def retrieval_ranks(
    image_embeds: Tensor, text_embeds: Tensor, text_to_image: Tensor, chunk_size: int = 1024
) -> tuple[Tensor, Tensor, Tensor]:
    """1-based ranks of the correct answers, in both directions.

    See the module docstring for the protocol. Ties are counted optimistically: only candidates that
    score *strictly* higher than the correct one push it down. The correct image of a caption, and all
    captions of an image, are never counted against it, even when float rounding gives two copies of the
    same score slightly different values.

    Args:
        image_embeds: ``[n_img, d]`` image embeddings (assumed L2-normalised), any float dtype, CPU or CUDA.
        text_embeds: ``[n_txt, d]`` text embeddings on the same device.
        text_to_image: ``[n_txt]`` integer index of each text's image in ``image_embeds``.
        chunk_size: Images and texts per block; memory use grows with ``chunk_size**2``.

    Returns:
        ``(t2i_ranks, i2t_ranks, i2t_images)``: int64 tensors on the embeddings' device.
        ``t2i_ranks[j]`` is the rank of text ``j``'s image; ``i2t_ranks[q]`` is the rank of the best caption
        of image ``i2t_images[q]``; ``i2t_images`` lists, ascending, the images that have at least one caption.

    Raises:
        VlkitError: On mismatched shapes or devices, out-of-range indices, empty inputs, non-float
            embeddings, NaN/infinite values or a non-positive ``chunk_size``.
    """
    _check_inputs(image_embeds, text_embeds, text_to_image, chunk_size)
    _check_finite(image_embeds, "image_embeds", chunk_size)
    _check_finite(text_embeds, "text_embeds", chunk_size)
    device = image_embeds.device
    n_img, n_txt = image_embeds.shape[0], text_embeds.shape[0]
    t2i = text_to_image.to(device=device, dtype=torch.long)

    # Score of every text with its own image, and every image's best caption score.
    pos_score = torch.empty(n_txt, dtype=torch.float32, device=device)
    for t0 in range(0, n_txt, chunk_size):
        t1 = min(t0 + chunk_size, n_txt)
        txt = text_embeds[t0:t1].float()
        img = image_embeds[t2i[t0:t1]].float()
        pos_score[t0:t1] = (txt * img).sum(dim=1)
    best_score = torch.full((n_img,), float("-inf"), dtype=torch.float32, device=device)
    best_score.scatter_reduce_(0, t2i, pos_score, reduce="amax", include_self=True)

    # One pass over [image chunk x text chunk] blocks; each block counts, for both directions, the
    # negatives that beat the correct answer.
    t2i_higher = torch.zeros(n_txt, dtype=torch.long, device=device)
    i2t_higher = torch.zeros(n_img, dtype=torch.long, device=device)
    for i0 in range(0, n_img, chunk_size):
        i1 = min(i0 + chunk_size, n_img)
        img = image_embeds[i0:i1].float()
        img_ids = torch.arange(i0, i1, device=device).unsqueeze(1)  # [ci, 1]
        img_best = best_score[i0:i1].unsqueeze(1)  # [ci, 1]
        for t0 in range(0, n_txt, chunk_size):
            t1 = min(t0 + chunk_size, n_txt)
            scores = img @ text_embeds[t0:t1].float().T  # [ci, ct]
            negative = img_ids != t2i[t0:t1].unsqueeze(0)  # [ci, ct]: text t0+j does not describe image i0+i
            t2i_higher[t0:t1] += ((scores > pos_score[t0:t1].unsqueeze(0)) & negative).sum(dim=0)
            i2t_higher[i0:i1] += ((scores > img_best) & negative).sum(dim=1)

    has_caption = torch.bincount(t2i, minlength=n_img) > 0
    i2t_images = has_caption.nonzero().squeeze(1)
    return t2i_higher + 1, i2t_higher[i2t_images] + 1, i2t_images


def _summary(ranks: Tensor) -> tuple[list[float], float, float]:
    ranks = ranks.cpu()
    n = ranks.numel()
    recalls = [100.0 * int((ranks <= k).sum()) / n for k in RECALL_KS]
    mean = int(ranks.sum()) / n
    ordered = ranks.sort().values
    mid = n // 2
    median = float(ordered[mid]) if n % 2 else (int(ordered[mid - 1]) + int(ordered[mid])) / 2
    return recalls, mean, median


def retrieval_metrics(
    image_embeds: Tensor, text_embeds: Tensor, text_to_image: Tensor, chunk_size: int = 1024
) -> RetrievalMetrics:
    """Recall@{1,5,10} and mean/median rank for text-to-image and image-to-text retrieval.

    Similarities are plain dot products computed in float32 (normalise the embeddings first if you
    want cosine similarity). Ties count optimistically: a candidate scoring exactly as high as the
    correct answer does not lower its rank. An image-to-text query is correct at rank ``r`` when any of
    the image's captions is in the top ``r``. Images without captions serve only as text-to-image
    distractors.

    Never builds the full ``[n_txt, n_img]`` similarity matrix: memory is ``O(chunk_size**2)`` on top
    of the inputs and per-item counters, and time is ``O(n_img * n_txt * d)``.

    Args:
        image_embeds: ``[n_img, d]`` image embeddings, any float dtype, CPU or CUDA.
        text_embeds: ``[n_txt, d]`` text embeddings on the same device.
        text_to_image: ``[n_txt]`` integer index of each caption's image.
        chunk_size: Images and texts scored per block.

    Returns:
        The metrics, recalls in percent and ranks 1-based.

    Raises:
        VlkitError: On bad shapes, devices, dtypes, out-of-range indices, empty or non-finite inputs.

    Example:
        Five captions per image, captions grouped by image::

            caption_image = torch.arange(len(img)).repeat_interleave(5)
            m = retrieval_metrics(img, txt, caption_image)
            log({**m.as_dict("val/coco/")})
    """
    t2i_ranks, i2t_ranks, _ = retrieval_ranks(image_embeds, text_embeds, text_to_image, chunk_size)
    (t1, t5, t10), t_mean, t_median = _summary(t2i_ranks)
    (i1, i5, i10), i_mean, i_median = _summary(i2t_ranks)
    return RetrievalMetrics(
        t2i_r1=t1,
        t2i_r5=t5,
        t2i_r10=t10,
        i2t_r1=i1,
        i2t_r5=i5,
        i2t_r10=i10,
        t2i_mean_rank=t_mean,
        t2i_median_rank=t_median,
        i2t_mean_rank=i_mean,
        i2t_median_rank=i_median,
        rsum=t1 + t5 + t10 + i1 + i5 + i10,
    )
