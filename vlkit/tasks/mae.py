"""Masked-autoencoder pre-training (task ``mae``) on the images of any Lance dataset; captions are not read.

Each step masks a new random ``mask_ratio`` share of every image's patches and trains the model to reconstruct
them (:class:`~vlkit.models.mae.model.MAE`). Validation reports the reconstruction loss on the validation split
under fixed masks (``val/<dataset>/mae_loss``, lower is better). At the end of training a figure of originals,
masked inputs and reconstructions of the first validation images is saved in the run folder
(``mae_reconstructions.png``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlkit.config.schema import TaskConfig
from vlkit.data.dataset import LanceImageTextDataset, make_loader
from vlkit.data.sampler import DistributedEpochSampler
from vlkit.errors import VlkitError
from vlkit.tasks import register_task
from vlkit.tasks.base import Task
from vlkit.train.distributed import all_gather_objects, unwrap

FIGURE_IMAGES = 8


def _require_mae(model: nn.Module) -> nn.Module:
    inner = unwrap(model)
    if not hasattr(inner, "forward_encoder") or not hasattr(inner, "random_mask"):
        raise VlkitError(f"task mae needs a masked-autoencoder model (mae-*), not {type(inner).__name__}")
    return inner


@register_task("mae")
class MAETask(Task):
    """Masked-autoencoder pre-training; see the module docstring. Args: as :class:`vlkit.tasks.base.Task`."""

    _model: nn.Module | None = None

    @classmethod
    def reads(cls, cfg: TaskConfig) -> list[str]:
        return []  # images only

    def _dataset(self, split: str, train: bool) -> LanceImageTextDataset:
        transform = self.preprocess.image_transform(train=train and self.augment)
        return LanceImageTextDataset(self.data.path, split, transform, None, captions="none", seed=self.seed)

    def train_loader(self, per_rank_batch: int) -> torch.utils.data.DataLoader:
        return self.shuffled_loader(self._dataset(self.data.train_split, train=True), per_rank_batch)

    def forward_backward(self, model: nn.Module, batch: dict[str, Any], micro_batches: int, autocast,
                         loss_scale: float = 1.0, scaler=None) -> dict[str, float]:
        """Forward and backward of one optimizer step's batch (in ``micro_batches`` parts); returns the loss."""
        object.__setattr__(self, "_model", _require_mae(model))  # a reference, not a submodule
        images = batch["image"].to(self.dist.device, non_blocking=True)
        if images.shape[0] % micro_batches:
            raise VlkitError(f"per-rank batch {images.shape[0]} is not divisible by grad_accum={micro_batches}")
        total = 0.0
        for part in images.chunk(micro_batches):
            with autocast:
                loss = model(part).loss
            scaled = loss * self.cfg.weight * loss_scale / micro_batches
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
            total += float(loss.detach()) / micro_batches
        return {"loss": total}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, autocast, batch_size: int = 64) -> dict[str, float]:
        """Mean reconstruction loss over the validation split, the same masks at every evaluation."""
        if not self.data.val_split:
            return {}
        inner = _require_mae(model)
        object.__setattr__(self, "_model", inner)  # a reference, not a submodule
        ds = self._dataset(self.data.val_split, train=False)
        sampler = DistributedEpochSampler(len(ds), self.dist.world_size, self.dist.rank, shuffle=False)
        was_training = inner.training
        inner.eval()
        gen = torch.Generator().manual_seed(self.seed + self.dist.rank)
        rows: list[tuple[int, float]] = []
        for batch in make_loader(ds, batch_size, sampler, num_workers=0):
            images = batch["image"].to(self.dist.device)
            mask = inner.random_mask(images.shape[0], torch.device("cpu"), gen)
            for name in ("keep", "mask", "restore"):
                setattr(mask, name, getattr(mask, name).to(images.device))
            with autocast:
                loss = float(inner(images, mask=mask).loss.float())
            rows.extend((i, loss) for i in batch["index"].tolist())  # each image carries its batch's mean
        inner.train(was_training)
        merged = dict(row for part in all_gather_objects(rows) for row in part)
        return {f"val/{self.key}/mae_loss": sum(merged.values()) / max(1, len(merged))}

    def save_beside(self, directory: str | Path) -> Path | None:
        """Save the reconstruction figure in the run folder (the parent of the saved model's ``directory``),
        once per run; None when the model was never run or there are no images to draw."""
        from vlkit.models.mae.figure import FIGURE_NAME, save_reconstruction_figure

        path = Path(directory).parent / FIGURE_NAME
        if self._model is None or path.exists():
            return None
        split = self.data.val_split or self.data.train_split
        ds = self._dataset(split, train=False)
        if len(ds) == 0:
            return None
        n = min(FIGURE_IMAGES, len(ds))
        images = ds.__getitems__(list(range(n)))["image"]  # [n, 3, H, W], normalised
        device = next(self._model.parameters()).device
        return save_reconstruction_figure(self._model, images.to(device), path, seed=self.seed)

    def state(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict() if self.sampler is not None else None}
