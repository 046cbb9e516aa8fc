"""Classification metrics from class scores: top-k accuracy, mean per-class recall, confusion matrix.

Predictions follow a stable ranking of the classes: by score, descending, ties broken by the lower class
index. The top-1 prediction is therefore ``argmax`` (the first maximal index), and top-1 accuracy always
equals the trace of the confusion matrix divided by the number of samples. A sample is correct at ``k`` when
its true class is among the first ``k`` of that ranking. ``k`` is capped at the number of classes.

Mean per-class recall (balanced accuracy) is the mean, over the classes that occur in ``labels``, of the
fraction of each class's samples predicted correctly; classes without samples are left out, as
scikit-learn's ``balanced_accuracy_score`` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vlkit.errors import VlkitError

TOP_KS = (1, 5)


@dataclass
class ClassificationMetrics:
    """Classification results on one set of samples.

    Attributes:
        top1: top-1 accuracy in percent (0-100).
        top5: top-5 accuracy in percent; with fewer than 5 classes, top-``num_classes`` (100).
        mean_per_class_recall: mean over the classes present in the labels of each class's recall, in percent.
        num_samples: number of samples scored.
        num_classes: number of classes scored against.
        per_class_recall: ``[num_classes]`` recall of each class in percent, NaN for a class without samples.
        confusion: ``[num_classes, num_classes]`` int64 counts; row = true class, column = predicted class.
    """

    top1: float
    top5: float
    mean_per_class_recall: float
    num_samples: int
    num_classes: int
    per_class_recall: Tensor
    confusion: Tensor

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """The scalar metrics as a flat dict, each key prefixed with ``prefix`` (e.g. ``"test/cifar/"``).

        The per-class recalls and the confusion matrix are left out; read them from the attributes.
        """
        return {f"{prefix}top1": self.top1, f"{prefix}top5": self.top5,
                f"{prefix}mean_per_class_recall": self.mean_per_class_recall}


def _check(scores: Tensor, labels: Tensor) -> None:
    if not isinstance(scores, Tensor) or not isinstance(labels, Tensor):
        raise VlkitError("classification metrics: scores and labels must be torch tensors")
    if scores.dim() != 2 or scores.shape[1] == 0:
        raise VlkitError(f"classification metrics: scores must be [samples, classes]; got {tuple(scores.shape)}")
    if labels.dim() != 1 or labels.shape[0] != scores.shape[0]:
        raise VlkitError(f"classification metrics: labels must have shape [{scores.shape[0]}]; "
                         f"got {tuple(labels.shape)}")
    if scores.shape[0] == 0:
        raise VlkitError("classification metrics: no samples")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise VlkitError(f"classification metrics: labels must be integer class indices; got {labels.dtype}")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= scores.shape[1]:
        raise VlkitError(f"classification metrics: label {lo if lo < 0 else hi} is outside "
                         f"[0, {scores.shape[1] - 1}] for {scores.shape[1]} classes")
    if torch.isnan(scores).any():
        raise VlkitError("classification metrics: scores hold NaN")


def true_class_ranks(scores: Tensor, labels: Tensor, chunk_size: int = 4096) -> Tensor:
    """1-based rank of each sample's true class in the stable descending ranking of its scores.

    Args:
        scores: ``[samples, classes]`` class scores (logits, similarities or probabilities); ``-inf`` is allowed.
        labels: ``[samples]`` true class indices.
        chunk_size: samples ranked at a time (memory ``chunk_size x classes``).

    Returns:
        ``[samples]`` int64 ranks: 1 + the classes scoring higher + the lower-index classes scoring the same.
    """
    _check(scores, labels)
    labels = labels.to(scores.device, torch.long)
    ranks = torch.empty(scores.shape[0], dtype=torch.long, device=scores.device)
    classes = torch.arange(scores.shape[1], device=scores.device)
    for s0 in range(0, scores.shape[0], chunk_size):
        block = scores[s0:s0 + chunk_size].float()  # [chunk, classes]
        lab = labels[s0:s0 + chunk_size].unsqueeze(1)  # [chunk, 1]
        true = block.gather(1, lab)  # [chunk, 1]
        ahead = (block > true) | ((block == true) & (classes.unsqueeze(0) < lab))
        ranks[s0:s0 + chunk_size] = ahead.sum(dim=1) + 1
    return ranks


def topk_accuracy(scores: Tensor, labels: Tensor, ks: tuple[int, ...] = TOP_KS) -> dict[int, float]:
    """Top-k accuracy in percent for each ``k`` in ``ks`` (each ``k`` capped at the number of classes).

    Returns:
        ``{k: accuracy}`` keyed by the requested ``k``.
    """
    ranks = true_class_ranks(scores, labels)
    n_cls = scores.shape[1]
    return {k: 100.0 * int((ranks <= min(k, n_cls)).sum()) / len(ranks) for k in ks}


def confusion_matrix(labels: Tensor, predictions: Tensor, num_classes: int) -> Tensor:
    """``[num_classes, num_classes]`` int64 counts: row = true class, column = predicted class."""
    labels, predictions = labels.long().cpu(), predictions.long().cpu()
    if labels.shape != predictions.shape:
        raise VlkitError(f"confusion matrix: {labels.numel()} labels but {predictions.numel()} predictions")
    flat = torch.bincount(labels * num_classes + predictions, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def per_class_recall(confusion: Tensor) -> Tensor:
    """``[classes]`` recall of each class in percent (diagonal / row sum), NaN for a class without samples."""
    support = confusion.sum(dim=1).double()
    recall = 100.0 * confusion.diagonal().double() / support
    return torch.where(support > 0, recall, torch.full_like(recall, float("nan")))


def classification_metrics(scores: Tensor, labels: Tensor) -> ClassificationMetrics:
    """Top-1 / top-5 accuracy, mean per-class recall and the confusion matrix of class scores.

    Args:
        scores: ``[samples, classes]`` class scores, higher is more likely; any float dtype, CPU or CUDA.
        labels: ``[samples]`` true class indices in ``[0, classes)``.

    Returns:
        The metrics (percentages, see :class:`ClassificationMetrics`).

    Raises:
        VlkitError: on bad shapes, non-integer or out-of-range labels, NaN scores or no samples.

    Example:
        >>> m = classification_metrics(image_embeds @ classifier.T, labels)
        >>> log(m.as_dict("test/cifar/"))
    """
    ranks = true_class_ranks(scores, labels).cpu()
    n, n_cls = scores.shape
    predictions = scores.float().argmax(dim=1).cpu()  # the first maximal index: rank-1 class
    confusion = confusion_matrix(labels, predictions, n_cls)
    recall = per_class_recall(confusion)
    present = ~torch.isnan(recall)
    return ClassificationMetrics(
        top1=100.0 * int((ranks <= 1).sum()) / n,
        top5=100.0 * int((ranks <= min(5, n_cls)).sum()) / n,
        mean_per_class_recall=float(recall[present].mean()),
        num_samples=n,
        num_classes=n_cls,
        per_class_recall=recall,
        confusion=confusion,
    )
