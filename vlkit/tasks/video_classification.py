"""Video classification (action recognition): a video model's class logits against the dataset's ``label``.

The model (a :class:`~vlkit.models.timesformer.TimeSformer`) reads clips ``[batch, frames, 3, H, W]`` of
``model.config.frames`` frames (:class:`~vlkit.data.video_dataset.LanceVideoDataset`: one frame from each of as
many equal segments, at random within a segment for training) and carries its own head, whose outputs must
match the dataset's classes. Training minimises cross-entropy. Evaluation reads ``clips`` clips per video
(evenly spaced within the segments) and averages their softmax scores per video, then reports top-1, top-5 and
mean per-class recall (the per-class recalls and the confusion matrix are in
:class:`~vlkit.metrics.classification.ClassificationMetrics`, shown by ``vlkit eval --task video-classification``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from vlkit.config.schema import DatasetConfig, TaskConfig
from vlkit.errors import VlkitError
from vlkit.metrics.classification import classification_metrics
from vlkit.tasks import register_task
from vlkit.tasks.base import Task
from vlkit.tasks.labels import dataset_classes, require_labels
from vlkit.train.distributed import DistInfo, all_gather_objects, unwrap


def average_clip_scores(scores: Tensor, clip_video: Tensor, videos: int) -> Tensor:
    """The mean softmax score of each video's clips.

    Args:
        scores: ``[clips_total, classes]`` logits of the clips.
        clip_video: ``[clips_total]`` the video (0 .. videos - 1) each clip belongs to.
        videos: number of videos.

    Returns:
        ``[videos, classes]`` mean class probabilities.

    Raises:
        VlkitError: a video without clips.
    """
    probs = scores.float().softmax(dim=-1)
    total = torch.zeros(videos, probs.shape[1], dtype=probs.dtype).index_add_(0, clip_video.cpu(), probs.cpu())
    counts = torch.bincount(clip_video.cpu(), minlength=videos)
    if (counts == 0).any():
        raise VlkitError(f"video {int((counts == 0).nonzero()[0])} of the batch has no clips")
    return total / counts[:, None].to(total.dtype)


@dataclass
class VideoScores:
    """Per-video scores of one pass over a split.

    Attributes:
        index: ``[videos]`` dataset positions, ascending.
        ids: the videos' row ids, in that order.
        scores: ``[videos, classes]`` mean clip probabilities.
        labels: ``[videos]`` true classes.
    """

    index: Tensor
    ids: list[str]
    scores: Tensor
    labels: Tensor


@torch.no_grad()
def video_scores(model: nn.Module, batches: Iterable[dict[str, Any]], device: torch.device,
                 autocast=None) -> list[tuple[int, str, Tensor, int]]:
    """``(index, id, scores, label)`` of every video in ``batches`` (batches of
    :class:`~vlkit.data.video_dataset.LanceVideoDataset`), clip scores averaged per video.

    Args:
        model: a video classifier (``model(video) -> [clips, classes]``), in evaluation mode.
        batches: loader batches with ``video``, ``clip_video``, ``index``, ``id`` and ``label``.
        device: where the model is.
        autocast: a context manager for the forward pass (None: none).
    """
    import contextlib

    rows = []
    for batch in batches:
        with autocast if autocast is not None else contextlib.nullcontext():
            logits = model(batch["video"].to(device)).float().cpu()  # [batch * clips, classes]
        n = batch["index"].shape[0]
        per_video = average_clip_scores(logits, batch["clip_video"], n)
        for j in range(n):
            rows.append((int(batch["index"][j]), str(batch["id"][j]), per_video[j], int(batch["label"][j])))
    return rows


def collect_scores(rows: Iterable[tuple[int, str, Tensor, int]]) -> VideoScores:
    """Rows of :func:`video_scores` (from every rank) in dataset order."""
    merged = {index: (row_id, s, y) for index, row_id, s, y in rows}
    order = sorted(merged)
    return VideoScores(torch.tensor(order, dtype=torch.long), [merged[k][0] for k in order],
                       torch.stack([merged[k][1] for k in order]), torch.tensor([merged[k][2] for k in order]))


def require_video_classifier(model: nn.Module, classes: int, what: str) -> int:
    """The model's frame count, after checking it is a video classifier with ``classes`` outputs.

    Raises:
        VlkitError: not a video model, or a head of another size.
    """
    inner = unwrap(model)
    config = getattr(inner, "config", None)
    if not hasattr(inner, "encode_video") or not hasattr(config, "frames") or not hasattr(config, "num_classes"):
        raise VlkitError(f"{what} needs a video classifier (timesformer-*), not {type(inner).__name__}")
    if config.num_classes != classes:
        raise VlkitError(f"{what}: the model has {config.num_classes} outputs but the dataset has {classes} "
                         f"classes; set model.args.num_classes={classes}")
    return int(config.frames)


@register_task("video_classification")
class VideoClassificationTask(Task):
    """Action recognition on one labelled video dataset; see the module docstring.

    Args: as :class:`vlkit.tasks.base.Task`, plus the model (its frame count and head size).
    """

    def __init__(self, key: str, cfg: TaskConfig, data: DatasetConfig, tokenizer, preprocess, dist: DistInfo,
                 seed: int = 0, augment: bool = True, model: nn.Module | None = None):
        super().__init__(key, cfg, data, tokenizer, preprocess, dist, seed, augment)
        require_labels(data.path, data.train_split, "task video_classification")
        self.class_names = dataset_classes(data.path)
        if model is None:
            raise VlkitError("task video_classification is built with the model (for its frames and classes)")
        self.frames = require_video_classifier(model, len(self.class_names), "task video_classification")

    @classmethod
    def reads(cls, cfg: TaskConfig) -> list[str]:
        return ["label", "video"]

    def dataset(self, split: str, train: bool, clips: int = 1):
        """The clips of ``split`` (:class:`~vlkit.data.video_dataset.LanceVideoDataset`)."""
        from vlkit.data.video_dataset import LanceVideoDataset

        transform = self.preprocess.image_transform(train=train and self.augment)
        return LanceVideoDataset(self.data.path, split, transform, num_frames=self.frames, train=train,
                                 clips=clips, captions="none", seed=self.seed)

    def train_loader(self, per_rank_batch: int) -> torch.utils.data.DataLoader:
        return self.shuffled_loader(self.dataset(self.data.train_split, train=True), per_rank_batch)

    def forward_backward(self, model: nn.Module, batch: dict[str, Any], micro_batches: int, autocast,
                         loss_scale: float = 1.0, scaler=None) -> dict[str, float]:
        if micro_batches != 1:
            raise VlkitError("task video_classification: use grad_accum=1")
        with autocast:
            logits = model(batch["video"].to(self.dist.device, non_blocking=True))  # [batch, classes]
        return self.backward_classes(logits, batch["label"], loss_scale, scaler)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, autocast, batch_size: int = 64) -> dict[str, float]:
        if not self.data.val_split:
            return {}
        from vlkit.data.dataset import make_loader
        from vlkit.data.sampler import DistributedEpochSampler

        ds = self.dataset(self.data.val_split, train=False, clips=self.cfg.clips)
        sampler = DistributedEpochSampler(len(ds), self.dist.world_size, self.dist.rank, shuffle=False)
        inner = unwrap(model)
        was_training = inner.training
        inner.eval()
        try:
            rows = video_scores(inner, make_loader(ds, batch_size, sampler, num_workers=0), self.dist.device,
                                autocast)
        finally:
            inner.train(was_training)
        merged = collect_scores(r for part in all_gather_objects(rows) for r in part)
        m = classification_metrics(merged.scores, merged.labels)
        return {f"val/{self.key}/accuracy": float(m.top1), f"val/{self.key}/top5": float(m.top5),
                f"val/{self.key}/mean_per_class_recall": float(m.mean_per_class_recall)}
