"""Linear probe: logistic regression on frozen image embeddings, a measure of what the image tower encodes.

The classifier is fitted on the embeddings of a training split and scored on another split. Its inverse
regularisation strength ``C`` is chosen on a held-out part of the training embeddings (a fixed 20%, drawn
with a seeded permutation, so the choice is reproducible) over a small logarithmic grid; the best ``C`` is
then refitted on all training embeddings. The fit is scikit-learn's ``LogisticRegression`` (L-BFGS,
multinomial loss).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from vlkit.errors import DataError, VlkitError
from vlkit.metrics.classification import ClassificationMetrics, classification_metrics
from vlkit.inference.embed import Embeddings, compute_embeddings
from vlkit.inference.loading import LoadedModel
from vlkit.tasks.labels import dataset_classes, require_labels

#: Inverse regularisation strengths tried, weakest regularisation last. The embeddings have unit norm, so
#: the useful values are large.
DEFAULT_C_GRID: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5)
HOLDOUT_FRACTION = 0.2
MAX_ITER = 1000


@dataclass
class ProbeFit:
    """A fitted probe and how its ``C`` was chosen.

    Attributes:
        classifier: the ``LogisticRegression`` refitted on all training embeddings with ``c``.
        c: the chosen inverse regularisation strength.
        holdout_accuracy: ``{C: accuracy in percent}`` on the held-out training embeddings.
        num_train: training embeddings used for the final fit.
    """

    classifier: object
    c: float
    holdout_accuracy: dict[float, float]
    num_train: int


def _logistic(c: float):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, max_iter=MAX_ITER)


def _fit(c: float, x: np.ndarray, y: np.ndarray):
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return _logistic(c).fit(x, y)


def holdout_split(n: int, fraction: float = HOLDOUT_FRACTION, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic ``(fit, held_out)`` index arrays: a seeded permutation, ``round(fraction * n)`` held out."""
    order = np.random.default_rng(seed).permutation(n)
    n_held = min(n - 1, max(1, round(fraction * n)))
    return np.sort(order[n_held:]), np.sort(order[:n_held])


def fit_probe(x: np.ndarray, y: np.ndarray, c_grid: Sequence[float] = DEFAULT_C_GRID,
              holdout: float = HOLDOUT_FRACTION, seed: int = 0) -> ProbeFit:
    """Choose ``C`` on a held-out part of ``(x, y)``, then refit on all of it.

    Args:
        x: ``[samples, dim]`` features.
        y: ``[samples]`` integer labels.
        c_grid: the ``C`` values tried; ties go to the first (the strongest regularisation).
        holdout: fraction of the samples held out for choosing ``C``.
        seed: seed of the held-out draw.

    Raises:
        VlkitError: fewer than 5 samples, or fewer than 2 classes among them.
    """
    if len(x) < 5:
        raise VlkitError(f"linear probe: {len(x)} training images are too few (need at least 5)")
    if len(np.unique(y)) < 2:
        raise VlkitError("linear probe: the training images hold only one class")
    if not c_grid:
        raise VlkitError("linear probe: empty C grid")
    fit_idx, held_idx = holdout_split(len(x), holdout, seed)
    scores: dict[float, float] = {}
    if len(c_grid) > 1 and len(np.unique(y[fit_idx])) >= 2:
        for c in c_grid:
            clf = _fit(c, x[fit_idx], y[fit_idx])
            scores[float(c)] = 100.0 * float((clf.predict(x[held_idx]) == y[held_idx]).mean())
        best = max(scores.values())
        c_best = next(c for c, acc in scores.items() if acc == best)
    else:
        c_best = float(c_grid[0])
    return ProbeFit(_fit(c_best, x, y), c_best, scores, len(x))


def class_scores(classifier, x: np.ndarray, num_classes: int) -> Tensor:
    """``[samples, num_classes]`` decision scores of a fitted probe; classes it never saw score ``-inf``."""
    raw = classifier.decision_function(x)
    if raw.ndim == 1:  # two classes: one score for classes_[1]
        raw = np.stack([np.zeros_like(raw), raw], axis=1)
    scores = np.full((len(x), num_classes), -np.inf)
    scores[:, classifier.classes_.astype(int)] = raw
    return torch.from_numpy(scores)


@dataclass
class LinearProbeResult:
    """A linear probe evaluated on one split.

    Attributes:
        metrics: top-1/top-5 accuracy, mean per-class recall, confusion matrix on the evaluated split.
        class_names: the classes, in label order.
        fit: the fitted probe, its ``C`` and the held-out accuracies.
        train_split: the split the probe was fitted on.
        scores: ``[images, classes]`` decision scores on the evaluated split.
        labels: ``[images]`` true labels.
        embeddings: the evaluated split's image embeddings (and ids).
    """

    metrics: ClassificationMetrics
    class_names: list[str]
    fit: ProbeFit
    train_split: str
    scores: Tensor
    labels: Tensor
    embeddings: Embeddings = field(repr=False)


def evaluate_linear_probe(loaded: LoadedModel, dataset: str | Path, split: str = "test", *,
                          train_split: str = "train", c_grid: Sequence[float] = DEFAULT_C_GRID,
                          seed: int = 0, batch_size: int = 64, limit: int | None = None,
                          num_workers: int = 0, progress: bool = False) -> LinearProbeResult:
    """Fit a logistic-regression probe on ``train_split``'s image embeddings and score it on ``split``.

    Args:
        loaded: the model (see :func:`vlkit.inference.loading.load_for_inference`).
        dataset: a vlkit Lance dataset with ``label``.
        split: the split to evaluate on.
        train_split: the split to fit on (must differ from ``split``).
        c_grid: inverse regularisation strengths to choose from.
        seed: seed of the held-out draw.
        batch_size: images per forward pass.
        limit: evaluate only the first ``limit`` images of ``split`` (the probe still sees all of
            ``train_split``).
        num_workers: image decoding worker processes.
        progress: show a progress bar.

    Raises:
        DataError: a split is missing or has unlabelled images, or the two splits are the same.
    """
    if split == train_split:
        raise DataError(f"linear probe: the evaluation split and the training split are both '{split}'; "
                        "pick another with --train-split")
    require_labels(dataset, split, "the linear probe")
    require_labels(dataset, train_split, "the linear probe")
    names = dataset_classes(dataset)
    common = dict(batch_size=batch_size, captions=False, num_workers=num_workers, progress=progress)
    train = compute_embeddings(loaded, dataset, train_split, **common)
    test = compute_embeddings(loaded, dataset, split, limit=limit, **common)
    num_classes = max(len(names), int(train.labels.max()) + 1, int(test.labels.max()) + 1)
    names = names + [f"class_{i}" for i in range(len(names), num_classes)]
    fit = fit_probe(train.image.numpy(), train.labels.numpy(), c_grid, seed=seed)
    scores = class_scores(fit.classifier, test.image.numpy(), num_classes)  # [images, classes]
    metrics = classification_metrics(scores, test.labels)
    return LinearProbeResult(metrics, names, fit, train_split, scores, test.labels, test)
