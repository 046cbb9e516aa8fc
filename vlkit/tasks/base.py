"""What every training task shares: its dataset and config, its training loader and the epoch it is in."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlkit.config.schema import DatasetConfig, TaskConfig
from vlkit.data.dataset import LanceImageTextDataset, make_loader
from vlkit.data.sampler import DistributedEpochSampler
from vlkit.errors import VlkitError
from vlkit.train.distributed import DistInfo


class Task(nn.Module):
    """The base of the training tasks: a subclass builds its training dataset and calls :meth:`shuffled_loader`,
    and says in :meth:`reads` which columns it reads (checked before training by :mod:`vlkit.tasks.preflight`).

    Args:
        key: the dataset's name in the config (used in metric names ``val/<key>/...``).
        cfg: the task's config.
        data: the dataset's config.
        tokenizer: the model's tokenizer.
        preprocess: the model's :class:`~vlkit.models.preprocess.Preprocess`.
        dist: process-group information.
        seed: seed of the data order and augmentations.
        augment: random crops and flips for training images.
    """

    def __init__(self, key: str, cfg: TaskConfig, data: DatasetConfig, tokenizer, preprocess, dist: DistInfo,
                 seed: int = 0, augment: bool = True):
        super().__init__()
        self.key, self.cfg, self.data, self.dist = key, cfg, data, dist
        self.tokenizer, self.preprocess, self.seed, self.augment = tokenizer, preprocess, seed, augment
        self.train_set: LanceImageTextDataset | None = None
        self.sampler: DistributedEpochSampler | None = None

    @classmethod
    def reads(cls, cfg: TaskConfig) -> list[str]:
        """The columns this task reads from its dataset's training and validation splits (each must hold values).

        Args:
            cfg: the task's config (a prompt, for example, replaces the captions).
        """
        return ["captions"]

    def shuffled_loader(self, ds: LanceImageTextDataset, per_rank_batch: int) -> torch.utils.data.DataLoader:
        """The training loader over ``ds``: a new shuffle every epoch, equal full batches on every rank.

        Raises:
            VlkitError: the dataset holds fewer rows than one global batch.
        """
        if len(ds) < per_rank_batch * self.dist.world_size:
            raise VlkitError(f"dataset {self.key}: {len(ds)} training images are fewer than one batch of "
                             f"{per_rank_batch * self.dist.world_size}; lower batch_size")
        self.train_set = ds
        self.sampler = DistributedEpochSampler(len(ds), self.dist.world_size, self.dist.rank, shuffle=True,
                                               seed=self.seed, drop_last=True)
        return make_loader(ds, per_rank_batch, self.sampler, num_workers=self.data.num_workers, drop_last=True,
                           pin_memory=self.dist.device.type == "cuda")

    def backward_classes(self, logits: torch.Tensor, labels: torch.Tensor, loss_scale: float = 1.0,
                         scaler=None) -> dict[str, float]:
        """Cross-entropy of class ``logits`` ``[batch, classes]`` against ``labels``, weighted by the task's
        ``weight`` and ``loss_scale``, backpropagated (through ``scaler`` when given); the step's loss and
        accuracy (percent)."""
        labels = labels.to(logits.device)
        loss = F.cross_entropy(logits.float(), labels)
        scaled = loss * self.cfg.weight * loss_scale
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        return {"loss": float(loss.detach()), "accuracy": float((logits.argmax(-1) == labels).float().mean()) * 100}

    def set_epoch(self, epoch: int, position: int = 0) -> None:
        """Start (or resume at ``position`` samples into) ``epoch`` of the training data."""
        self.train_set.set_epoch(epoch)
        self.sampler.set_epoch(epoch)
        self.sampler.set_position(position)
