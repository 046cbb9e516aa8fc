"""Image-text classification with a fusion model: visual entailment, visual reasoning, or any labelled pairs.

Each image is paired with a text (the task's ``prompt`` for every image, e.g. a question, or else the image's
first caption, e.g. an entailment hypothesis), the fusion model's fused ``[CLS]`` feature goes through a linear
head, and cross-entropy trains it against the dataset's ``label``. Evaluation reports top-1 accuracy and mean
per-class recall on the validation split. The head belongs to the task: it is saved in training checkpoints,
and with the final model (``classifier.safetensors`` + ``classifier.json``, see
:class:`vlkit.models.io.SavedClassifier`) for ``vlkit eval --task classification`` and ``vlkit predict``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlkit.config.schema import DatasetConfig, TaskConfig
from vlkit.data.dataset import LanceImageTextDataset, make_loader
from vlkit.data.sampler import DistributedEpochSampler
from vlkit.errors import VlkitError
from vlkit.metrics.classification import classification_metrics
from vlkit.models.io import SavedClassifier
from vlkit.tasks import register_task
from vlkit.tasks.labels import dataset_classes, require_labels
from vlkit.tasks.base import Task
from vlkit.train.distributed import unwrap
from vlkit.train.distributed import DistInfo, all_gather_objects


def fused_width(model: nn.Module) -> int:
    config = unwrap(model).config
    width = getattr(config, "text_width", None) or getattr(config, "width", None)
    if width is None or not hasattr(unwrap(model), "fuse"):
        raise VlkitError(f"task classification needs a fusion model (albef-*, vilt-*), not {type(unwrap(model)).__name__}")
    return int(width)


def pair_logits(model: nn.Module, head: nn.Module, tokenizer, images: torch.Tensor, texts: list[str],
                device: torch.device) -> torch.Tensor:
    """Class scores of (image, text) pairs: the fusion model's fused ``[CLS]`` feature through ``head``.

    Args:
        model: a fusion model (``forward(images, input_ids, attention_mask, head="cls")``).
        head: the linear classification head.
        tokenizer: the model's tokenizer.
        images: ``[batch, 3, H, W]`` preprocessed images.
        texts: one text per image (the prompt, or the image's caption, e.g. an entailment hypothesis).
        device: where the model is.

    Returns:
        ``[batch, classes]`` logits, float32.
    """
    tokens = tokenizer(texts)
    cls = model(images.to(device), tokens["input_ids"].to(device), tokens["attention_mask"].to(device), head="cls")
    return head(cls.float())  # [batch, classes]


@register_task("classification")
class ClassificationTask(Task):
    """Classification of (image, text) pairs on one labelled dataset; see the module docstring.

    Args: as :class:`vlkit.tasks.base.Task`, plus the model (for the width of its fused feature).
    """

    def __init__(self, key: str, cfg: TaskConfig, data: DatasetConfig, tokenizer, preprocess, dist: DistInfo,
                 seed: int = 0, augment: bool = True, model: nn.Module | None = None):
        super().__init__(key, cfg, data, tokenizer, preprocess, dist, seed, augment)
        require_labels(data.path, data.train_split, "task classification")
        self.class_names = dataset_classes(data.path)
        if model is None:
            raise VlkitError("task classification is built with the model (for its fused feature width)")
        self.head = nn.Linear(fused_width(model), len(self.class_names))

    @classmethod
    def reads(cls, cfg: TaskConfig) -> list[str]:
        return ["label"] if cfg.prompt else ["label", "captions"]

    def _dataset(self, split: str, train: bool) -> LanceImageTextDataset:
        captions = "none" if self.cfg.prompt else ("random" if train else "first")
        return LanceImageTextDataset(self.data.path, split, self.preprocess.image_transform(train=train and self.augment),
                                     None, captions=captions, seed=self.seed)

    def train_loader(self, per_rank_batch: int) -> torch.utils.data.DataLoader:
        return self.shuffled_loader(self._dataset(self.data.train_split, train=True), per_rank_batch)

    def saved_classifier(self) -> SavedClassifier:
        """The head, its class names and prompt, as saved with the final model."""
        return SavedClassifier(self.head, list(self.class_names), self.cfg.prompt)

    def _logits(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        n = batch["image"].shape[0]
        texts = [self.cfg.prompt] * n if self.cfg.prompt else batch["text"]
        return pair_logits(model, self.head, self.tokenizer, batch["image"], texts, self.dist.device)

    def forward_backward(self, model: nn.Module, batch: dict[str, Any], micro_batches: int, autocast,
                         loss_scale: float = 1.0, scaler=None) -> dict[str, float]:
        if micro_batches != 1:
            raise VlkitError("task classification: use grad_accum=1")
        with autocast:
            logits = self._logits(model, batch)
        return self.backward_classes(logits, batch["label"], loss_scale, scaler)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, autocast, batch_size: int = 64) -> dict[str, float]:
        if not self.data.val_split:
            return {}
        ds = self._dataset(self.data.val_split, train=False)
        sampler = DistributedEpochSampler(len(ds), self.dist.world_size, self.dist.rank, shuffle=False)
        inner = unwrap(model)
        was_training, head_training = inner.training, self.head.training
        inner.eval()
        self.head.eval()
        rows = []
        for batch in make_loader(ds, batch_size, sampler, num_workers=0):
            with autocast:
                logits = self._logits(inner, batch).float().cpu()
            for j, index in enumerate(batch["index"].tolist()):
                rows.append((index, logits[j], int(batch["label"][j])))
        inner.train(was_training)
        self.head.train(head_training)
        merged = {index: (s, y) for part in all_gather_objects(rows) for index, s, y in part}
        scores = torch.stack([merged[k][0] for k in sorted(merged)])
        labels = torch.tensor([merged[k][1] for k in sorted(merged)])
        m = classification_metrics(scores, labels)
        return {f"val/{self.key}/accuracy": float(m.top1),
                f"val/{self.key}/mean_per_class_recall": float(m.mean_per_class_recall)}
