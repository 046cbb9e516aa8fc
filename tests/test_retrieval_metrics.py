"""Retrieval metrics: chunked computation against a slow full-matrix reference, hand-made cases, errors."""

from __future__ import annotations

import statistics

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from vlkit.errors import VlkitError
from vlkit.metrics import RetrievalMetrics, retrieval_metrics, retrieval_ranks

# ---------------------------------------------------------------- reference


def reference_metrics(img: torch.Tensor, txt: torch.Tensor, t2i: torch.Tensor) -> RetrievalMetrics:
    """The obvious way: the whole similarity matrix, an argsort per query, Python loops."""
    sims = txt.float() @ img.float().T  # [n_txt, n_img]
    t2i = t2i.tolist()
    t2i_ranks = []
    for j in range(sims.shape[0]):
        order = torch.argsort(sims[j], descending=True).tolist()
        t2i_ranks.append(order.index(t2i[j]) + 1)
    i2t_ranks = []
    for i in range(sims.shape[1]):
        if i not in t2i:
            continue
        order = torch.argsort(sims[:, i], descending=True).tolist()
        i2t_ranks.append(next(pos for pos, j in enumerate(order) if t2i[j] == i) + 1)

    def recall(ranks: list[int], k: int) -> float:
        return 100.0 * sum(r <= k for r in ranks) / len(ranks)

    t = [recall(t2i_ranks, k) for k in (1, 5, 10)]
    i = [recall(i2t_ranks, k) for k in (1, 5, 10)]
    return RetrievalMetrics(
        t2i_r1=t[0], t2i_r5=t[1], t2i_r10=t[2],
        i2t_r1=i[0], i2t_r5=i[1], i2t_r10=i[2],
        t2i_mean_rank=sum(t2i_ranks) / len(t2i_ranks),
        t2i_median_rank=float(statistics.median(t2i_ranks)),
        i2t_mean_rank=sum(i2t_ranks) / len(i2t_ranks),
        i2t_median_rank=float(statistics.median(i2t_ranks)),
        rsum=t[0] + t[1] + t[2] + i[0] + i[1] + i[2],
    )


def random_problem(n_img: int = 41, dim: int = 16, noise: float = 2.5, seed: int = 0, captionless: int = 0):
    """Images with 1 to 5 captions each (several with exactly one), captions shuffled, some images without any."""
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n_img, dim, generator=g), dim=-1)
    counts = torch.randint(1, 6, (n_img,), generator=g)
    counts[::4] = 1
    if captionless:
        counts[-captionless:] = 0
    t2i = torch.repeat_interleave(torch.arange(n_img), counts)
    t2i = t2i[torch.randperm(len(t2i), generator=g)]
    txt = F.normalize(img[t2i] + noise * torch.randn(len(t2i), dim, generator=g) / dim**0.5, dim=-1)
    return img, txt, t2i


# ---------------------------------------------------------------- against the reference


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1000])
def test_matches_reference_for_every_chunk_size(chunk_size):
    img, txt, t2i = random_problem()
    expected = reference_metrics(img, txt, t2i)
    got = retrieval_metrics(img, txt, t2i, chunk_size=chunk_size)
    assert got == expected
    # The problem is neither trivial nor hopeless, so the comparison means something.
    assert all(0 < v < 100 for v in (got.t2i_r1, got.t2i_r5, got.t2i_r10, got.i2t_r1, got.i2t_r5, got.i2t_r10))
    assert got.t2i_median_rank > 1 and got.i2t_median_rank > 1


def test_never_builds_the_full_similarity_matrix():
    """Every intermediate tensor is O(chunk**2), O(chunk * dim) or O(n): none is [n_txt, n_img]."""
    img, txt, t2i = random_problem()
    chunk = 4
    largest = 0

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            nonlocal largest
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    largest = max(largest, t.numel())
            return out

    with Watch():
        got = retrieval_metrics(img, txt, t2i, chunk_size=chunk)
    assert got == reference_metrics(img, txt, t2i)
    assert largest <= max(chunk * chunk, chunk * img.shape[1], len(img), len(txt))
    assert largest < len(img) * len(txt) / 10


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_matches_reference_other_seeds_and_shapes(seed):
    img, txt, t2i = random_problem(n_img=23 + seed, dim=8, noise=2.0, seed=seed, captionless=3)
    expected = reference_metrics(img, txt, t2i)
    for chunk_size in (2, 5, 64):
        assert retrieval_metrics(img, txt, t2i, chunk_size=chunk_size) == expected


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes_are_scored_in_float32(dtype):
    img, txt, t2i = random_problem(seed=5)
    img, txt = img.to(dtype), txt.to(dtype)
    assert retrieval_metrics(img, txt, t2i, chunk_size=6) == reference_metrics(img, txt, t2i)


def test_ranks_match_reference_per_query():
    img, txt, t2i = random_problem(seed=7, captionless=2)
    t2i_ranks, i2t_ranks, images = retrieval_ranks(img, txt, t2i, chunk_size=4)
    sims = txt @ img.T
    for j in range(len(t2i)):
        assert t2i_ranks[j] == 1 + int((sims[j] > sims[j, t2i[j]]).sum())
    assert images.tolist() == sorted(set(t2i.tolist()))
    for q, i in enumerate(images.tolist()):
        best = sims[t2i == i, i].max()
        assert i2t_ranks[q] == 1 + int((sims[:, i] > best).sum())
    assert t2i_ranks.dtype == i2t_ranks.dtype == torch.long


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    img, txt, t2i = random_problem(n_img=300, dim=32, seed=11)
    cpu = retrieval_metrics(img, txt, t2i, chunk_size=64)
    assert retrieval_metrics(img.cuda(), txt.cuda(), t2i.cuda(), chunk_size=64) == cpu
    assert retrieval_metrics(img.cuda().half(), txt.cuda().half(), t2i, chunk_size=100).t2i_r10 > 0


# ---------------------------------------------------------------- hand-made cases


def test_perfect_retrieval():
    img = torch.eye(4)
    t2i = torch.tensor([0, 0, 1, 2, 3, 3, 3])
    txt = img[t2i]
    m = retrieval_metrics(img, txt, t2i, chunk_size=2)
    assert (m.t2i_r1, m.t2i_r5, m.t2i_r10, m.i2t_r1, m.i2t_r5, m.i2t_r10) == (100.0,) * 6
    assert (m.t2i_mean_rank, m.t2i_median_rank, m.i2t_mean_rank, m.i2t_median_rank) == (1.0,) * 4
    assert m.rsum == 600.0


def test_known_scores():
    # With identity image embeddings, each text row *is* its scores against the images.
    img = torch.eye(3)
    txt = torch.tensor([[0.1, 0.9, 0.5], [0.2, 0.8, 0.3], [0.7, 0.6, 0.4]])
    t2i = torch.tensor([0, 1, 2])
    t2i_ranks, i2t_ranks, _ = retrieval_ranks(img, txt, t2i)
    assert t2i_ranks.tolist() == [3, 1, 3]
    assert i2t_ranks.tolist() == [3, 2, 2]  # image columns: [.1 .2 .7], [.9 .8 .6], [.5 .3 .4]
    m = retrieval_metrics(img, txt, t2i, chunk_size=1)
    assert m.t2i_r1 == 100.0 / 3 and m.t2i_r5 == 100.0
    assert m.i2t_r1 == 0.0 and m.i2t_r5 == 100.0
    assert m.t2i_mean_rank == 7 / 3 and m.t2i_median_rank == 3.0
    assert m.i2t_mean_rank == 7 / 3 and m.i2t_median_rank == 2.0


def test_known_permutation_with_optimistic_ties():
    # Text j lands exactly on image perm[j]; its own image scores 0, tied with the other two images.
    perm = [1, 2, 3, 0]
    img = torch.eye(4)
    txt = torch.eye(4)[perm]
    t2i = torch.arange(4)
    m = retrieval_metrics(img, txt, t2i, chunk_size=3)
    # One wrong image (or text) scores strictly higher; the zero-score ties do not count.
    assert (m.t2i_r1, m.t2i_r5, m.i2t_r1, m.i2t_r5) == (0.0, 100.0, 0.0, 100.0)
    assert (m.t2i_mean_rank, m.t2i_median_rank, m.i2t_mean_rank, m.i2t_median_rank) == (2.0, 2.0, 2.0, 2.0)
    # Fixing the permutation makes it perfect.
    fixed = retrieval_metrics(img, txt, torch.tensor(perm))
    assert fixed.rsum == 600.0


def test_exact_duplicates_tie_optimistically():
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    t2i = torch.tensor([0, 1, 2])
    m = retrieval_metrics(img, img.clone(), t2i)
    assert m.rsum == 600.0 and m.t2i_mean_rank == 1.0 and m.i2t_mean_rank == 1.0


def test_image_hit_by_its_second_caption_counts():
    img = torch.eye(2)
    # Image 0 has two captions: the first scores badly (0.1), the second is the best text for it (0.95).
    txt = torch.tensor([[0.1, 0.9], [0.95, 0.0], [0.2, 0.5]])
    t2i = torch.tensor([0, 0, 1])
    _, i2t_ranks, images = retrieval_ranks(img, txt, t2i)
    assert images.tolist() == [0, 1]
    assert i2t_ranks.tolist() == [1, 2]  # image 1: text 0 (0.9) beats its caption (0.5)
    m = retrieval_metrics(img, txt, t2i, chunk_size=1)
    assert m.i2t_r1 == 50.0 and m.i2t_r5 == 100.0
    # Swapping the caption order changes nothing.
    assert retrieval_metrics(img, txt[[1, 0, 2]], t2i) == m


def test_image_without_captions_is_only_a_distractor():
    img = torch.eye(3)
    txt = torch.tensor([[0.9, 0.0, 0.95], [0.8, 0.1, 0.0], [0.0, 0.7, 0.0]])
    t2i = torch.tensor([0, 0, 1])
    t2i_ranks, i2t_ranks, images = retrieval_ranks(img, txt, t2i)
    assert t2i_ranks.tolist() == [2, 1, 1]  # image 2 pushes text 0's image down
    assert images.tolist() == [0, 1]  # image 2 is no query
    assert i2t_ranks.tolist() == [1, 1]
    assert retrieval_metrics(img, txt, t2i).i2t_r1 == 100.0


def test_as_dict():
    m = retrieval_metrics(torch.eye(2), torch.eye(2), torch.tensor([0, 1]))
    d = m.as_dict("val/coco/")
    assert list(d) == [
        "val/coco/t2i_r1", "val/coco/t2i_r5", "val/coco/t2i_r10",
        "val/coco/i2t_r1", "val/coco/i2t_r5", "val/coco/i2t_r10",
        "val/coco/t2i_mean_rank", "val/coco/t2i_median_rank",
        "val/coco/i2t_mean_rank", "val/coco/i2t_median_rank", "val/coco/rsum",
    ]
    assert d["val/coco/rsum"] == 600.0
    assert m.as_dict()["t2i_r1"] == 100.0


def test_median_of_even_number_of_queries_is_the_mean_of_the_middle_two():
    img = torch.eye(2)
    txt = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # text 1 (of image 1) ranks 2nd
    m = retrieval_metrics(img, txt, torch.tensor([0, 1]))
    assert m.t2i_median_rank == 1.5 and m.t2i_mean_rank == 1.5


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("bad", [[0, 3], [-1, 0]])
def test_index_out_of_range(bad):
    with pytest.raises(VlkitError, match="outside"):
        retrieval_metrics(torch.eye(3), torch.eye(3)[:2], torch.tensor(bad))


def test_dims_disagree():
    with pytest.raises(VlkitError, match="dim"):
        retrieval_metrics(torch.randn(4, 8), torch.randn(4, 6), torch.arange(4))


@pytest.mark.parametrize(
    "img, txt, t2i, match",
    [
        (torch.randn(4, 8), torch.randn(5, 8), torch.arange(4), "shape"),  # one index per text
        (torch.randn(8), torch.randn(4, 8), torch.arange(4), "2-D"),
        (torch.randn(4, 8), torch.randn(4, 8), torch.arange(4).float(), "integer"),
        (torch.randn(4, 8).long(), torch.randn(4, 8), torch.arange(4), "floating"),
        (torch.randn(0, 8), torch.randn(0, 8), torch.arange(0), "at least one"),
    ],
)
def test_bad_inputs(img, txt, t2i, match):
    with pytest.raises(VlkitError, match=match):
        retrieval_metrics(img, txt, t2i)


def test_bad_chunk_size_and_nan():
    with pytest.raises(VlkitError, match="chunk_size"):
        retrieval_metrics(torch.eye(2), torch.eye(2), torch.arange(2), chunk_size=0)
    txt = torch.eye(3)
    txt[2, 1] = float("nan")
    with pytest.raises(VlkitError, match="text_embeds row 2"):
        retrieval_metrics(torch.eye(3), txt, torch.arange(3), chunk_size=2)


# ---------------------------------------------------------------- chunked == unchunked at a realistic size


def test_chunked_equals_full_matrix_300_images_1500_captions():
    """300 images x 1500 captions (5 each, shuffled): every chunk size gives what the whole similarity matrix
    gives. Integer-valued embeddings make every dot product exact in float32 whatever the summation order,
    so the many exact ties are the same ties in every chunking (and are counted optimistically)."""
    g = torch.Generator().manual_seed(21)
    n_img, per_image, dim = 300, 5, 16
    img = torch.randint(-3, 4, (n_img, dim), generator=g)
    t2i = torch.arange(n_img).repeat_interleave(per_image)
    t2i = t2i[torch.randperm(len(t2i), generator=g)]
    txt = img[t2i] + torch.randint(-4, 5, (len(t2i), dim), generator=g)

    sims = txt @ img.T  # [1500, 300] exact int64
    own = sims[torch.arange(len(t2i)), t2i]
    t2i_ranks = 1 + (sims > own.unsqueeze(1)).sum(dim=1)
    best = torch.full((n_img,), torch.iinfo(torch.long).min).scatter_reduce(0, t2i, own, reduce="amax")
    other = t2i.unsqueeze(1) != torch.arange(n_img).unsqueeze(0)  # [1500, 300]: text j is not image i's
    i2t_ranks = 1 + ((sims > best.unsqueeze(0)) & other).sum(dim=0)
    assert int((sims == own.unsqueeze(1)).sum()) > len(t2i) + 100  # ties besides the true pairs do occur

    def summary(ranks):
        return ([100.0 * int((ranks <= k).sum()) / len(ranks) for k in (1, 5, 10)],
                ranks.double().mean().item(), float(statistics.median(ranks.tolist())))

    (t1, t5, t10), t_mean, t_med = summary(t2i_ranks)
    (i1, i5, i10), i_mean, i_med = summary(i2t_ranks)
    expected = RetrievalMetrics(t1, t5, t10, i1, i5, i10, t_mean, t_med, i_mean, i_med, t1 + t5 + t10 + i1 + i5 + i10)
    assert 0 < t1 < 100 and 0 < i1 < 100 and t_med > 1  # a problem where ranks vary

    full = retrieval_metrics(img.float(), txt.float(), t2i, chunk_size=10**6)  # one block: no chunking
    for chunk_size in (13, 64, 299, 300, 1000, 1500):
        got = retrieval_metrics(img.float(), txt.float(), t2i, chunk_size=chunk_size)
        assert got == full, chunk_size
    assert full.as_dict() == pytest.approx(expected.as_dict(), rel=1e-12, abs=0)
    ranks_t, ranks_i, images = retrieval_ranks(img.float(), txt.float(), t2i, chunk_size=64)
    assert torch.equal(ranks_t, t2i_ranks) and torch.equal(ranks_i, i2t_ranks) and len(images) == n_img
