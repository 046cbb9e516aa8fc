"""What the tasks that train on images alone share (``vqvae``, ``beit``): no captions read, a training loader
of images, a step split into micro-batches, and a pass over the validation split."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from vlkit.config.schema import TaskConfig
from vlkit.data.dataset import LanceImageTextDataset, make_loader
from vlkit.data.sampler import DistributedEpochSampler
from vlkit.tasks.base import Task
from vlkit.train.distributed import unwrap


class ImageOnlyTask(Task):
    """A task on the images of a dataset (any Lance dataset made by ``vlkit ingest``; captions are not needed).

    A subclass implements :meth:`step_loss`; :meth:`forward_backward` splits the batch into ``micro_batches``
    parts, each weighted by its share of the images, with the gradient synchronised once (on the last part).
    """

    @classmethod
    def reads(cls, cfg: TaskConfig) -> list[str]:
        return []

    def dataset(self, split: str, train: bool) -> LanceImageTextDataset:
        """The images of ``split`` (augmented for training when the config asks)."""
        transform = self.preprocess.image_transform(train=train and self.augment)
        return LanceImageTextDataset(self.data.path, split, transform, None, captions="none", seed=self.seed)

    def train_loader(self, per_rank_batch: int) -> torch.utils.data.DataLoader:
        return self.shuffled_loader(self.dataset(self.data.train_split, train=True), per_rank_batch)

    def step_loss(self, model: nn.Module, images: torch.Tensor, autocast) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one micro-batch of images ``[batch, 3, H, W]`` (on the device) and its logged values."""
        raise NotImplementedError

    def forward_backward(self, model: nn.Module, batch: dict[str, Any], micro_batches: int, autocast,
                         loss_scale: float = 1.0, scaler=None) -> dict[str, float]:
        images = batch["image"]
        n = images.shape[0]
        size = -(-n // micro_batches)
        starts = list(range(0, n, size))
        logs: dict[str, float] = {}
        for k, start in enumerate(starts):
            part = images[start:start + size].to(self.dist.device, non_blocking=True)
            share = part.shape[0] / n
            last = k == len(starts) - 1
            sync = model.no_sync() if hasattr(model, "no_sync") and not last else contextlib.nullcontext()
            with sync:
                loss, values = self.step_loss(model, part, autocast)
                scaled = loss * self.cfg.weight * loss_scale * share
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            for name, value in values.items():
                logs[name] = logs.get(name, 0.0) + value * share
        return logs

    def validation_batches(self, model: nn.Module, batch_size: int) -> Iterator[torch.Tensor]:
        """This rank's share of the validation images, in batches on the device, with the model in evaluation
        mode for the pass (its mode is restored afterwards)."""
        ds = self.dataset(self.data.val_split, train=False)
        sampler = DistributedEpochSampler(len(ds), self.dist.world_size, self.dist.rank, shuffle=False)
        inner = unwrap(model)
        was_training = inner.training
        inner.eval()
        try:
            for batch in make_loader(ds, batch_size, sampler, num_workers=0):
                yield batch["image"].to(self.dist.device)
        finally:
            inner.train(was_training)
