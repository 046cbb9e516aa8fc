"""NLVR2: is a sentence true of a pair of images? A fusion model reads each image with the sentence, and a head
over the two fused ``[CLS]`` features, concatenated, tells true from false (as ALBEF and ViLT do it).

The task reads datasets whose rows hold two images (``image``, ``image2``: :mod:`vlkit.data.readers.nlvr2`,
``vlkit data synth --kind pairs``), their sentence (the first caption) and ``label`` (1 true, 0 false). Training
minimises cross-entropy; validation reports accuracy. The head belongs to the task: it is saved in training
checkpoints and, when training ends, beside the model as ``nlvr2_head.safetensors`` (read back by
:func:`load_pair_head`), so ``vlkit eval --task nlvr2`` scores a run, its model folder or a checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from vlkit.config.schema import DatasetConfig, TaskConfig
from vlkit.data.dataset import LanceImageTextDataset, make_loader
from vlkit.data.sampler import DistributedEpochSampler
from vlkit.errors import VlkitError
from vlkit.tasks import register_task
from vlkit.tasks.base import Task
from vlkit.tasks.labels import dataset_classes, require_labels
from vlkit.train.distributed import DistInfo, all_gather_objects, unwrap

HEAD_NAME = "nlvr2_head.safetensors"
#: the labels of a pair dataset, by index
PAIR_CLASSES = ("false", "true")


class PairHead(nn.Module):
    """Two fused ``[CLS]`` features, concatenated, to true/false logits: ``[batch, 2 * width]`` -> ``[batch, 2]``.

    Linear (``2 * width`` -> ``2 * width``), LayerNorm, GELU, linear to the two classes, as ViLT's NLVR2 head.

    Args:
        width: the width of one fused feature.
    """

    def __init__(self, width: int):
        super().__init__()
        self.width = width
        self.mlp = nn.Sequential(nn.Linear(2 * width, 2 * width), nn.LayerNorm(2 * width), nn.GELU(),
                                 nn.Linear(2 * width, 2))

    def forward(self, left: Tensor, right: Tensor) -> Tensor:
        return self.mlp(torch.cat([left, right], dim=-1))  # [batch, 2]


def pair_logits(model: nn.Module, head: PairHead, tokenizer, images: Tensor, images2: Tensor, texts: Sequence[str],
                device: torch.device) -> Tensor:
    """True/false logits ``[batch, 2]`` of ``texts`` about the pairs ``(images[i], images2[i])``.

    Both images of every pair go through the fusion model in one forward pass (``head="cls"``), each with the
    sentence, so wrappers that act on ``forward`` (DDP) see one call.
    """
    tokens = tokenizer(list(texts))
    ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
    n = images.shape[0]
    both = torch.cat([images, images2]).to(device)  # [2 * batch, 3, S, S]: lefts, then rights
    cls = model(both, ids.repeat(2, 1), mask.repeat(2, 1), head="cls")  # [2 * batch, width]
    return head(cls[:n].float(), cls[n:].float())


def fused_width(model: nn.Module, what: str = "task nlvr2") -> int:
    """The width of a fusion model's fused ``[CLS]`` feature.

    Raises:
        VlkitError: the model fuses nothing (a two-tower model such as CLIP).
    """
    inner = unwrap(model)
    width = getattr(inner.config, "text_width", None) or getattr(inner.config, "width", None)
    if width is None or not hasattr(inner, "fuse"):
        raise VlkitError(f"{what} needs a fusion model (albef-*, vilt-*), not {type(inner).__name__}")
    return int(width)


def check_pair_labels(dataset, task: str) -> None:
    """A pair dataset has at most two classes, labels 0 (false) and 1 (true), as the NLVR2 reader stores them.

    Raises:
        VlkitError: more classes (naming the dataset and them).
    """
    names = dataset_classes(dataset)
    if len(names) > 2:
        raise VlkitError(f"{task}: {dataset} has the classes {names}; NLVR2 pairs are labelled false (0) or "
                         "true (1)")


def load_pair_head(directory: str | Path) -> PairHead | None:
    """The head saved beside a model (``nlvr2_head.safetensors``), or None when there is none.

    Raises:
        VlkitError: the file is not a readable head (naming it).
    """
    from safetensors.torch import load_file

    path = Path(directory) / HEAD_NAME
    if not path.exists():
        return None
    try:
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise VlkitError(f"{path}: not a readable safetensors file ({exc})") from None
    return head_from_state(state, str(path))


def head_from_state(state: dict[str, Tensor], where: str) -> PairHead:
    """A :class:`PairHead` from its state dict (keys ``mlp.*``; a task's own state has them under ``head.``)."""
    state = {k.removeprefix("head."): v for k, v in state.items() if k.startswith(("mlp.", "head.mlp."))}
    weight = state.get("mlp.0.weight")
    if weight is None or weight.dim() != 2 or weight.shape[1] % 2:
        raise VlkitError(f"{where}: not an NLVR2 pair head (no mlp.0.weight [2 * width, 2 * width])")
    head = PairHead(weight.shape[1] // 2)
    try:
        head.load_state_dict({k: v.float() for k, v in state.items()})
    except RuntimeError as exc:
        raise VlkitError(f"{where}: not an NLVR2 pair head ({str(exc).splitlines()[0]})") from None
    return head.eval()


@register_task("nlvr2")
class NLVR2Task(Task):
    """NLVR2 on one dataset of image pairs; see the module docstring.

    Args: as :class:`vlkit.tasks.base.Task`, plus the model (a fusion model, for the width of its feature).
    """

    def __init__(self, key: str, cfg: TaskConfig, data: DatasetConfig, tokenizer, preprocess, dist: DistInfo,
                 seed: int = 0, augment: bool = True, model: nn.Module | None = None):
        super().__init__(key, cfg, data, tokenizer, preprocess, dist, seed, augment)
        require_labels(data.path, data.train_split, "task nlvr2")
        check_pair_labels(data.path, "task nlvr2")
        if model is None:
            raise VlkitError("task nlvr2 is built with the model (for its fused feature width)")
        self.head = PairHead(fused_width(model))

    @classmethod
    def reads(cls, cfg: TaskConfig) -> list[str]:
        return ["label", "captions", "image2"]

    def _dataset(self, split: str, train: bool) -> LanceImageTextDataset:
        transform = self.preprocess.image_transform(train=train and self.augment)
        return LanceImageTextDataset(self.data.path, split, transform, None, captions="random" if train else "first",
                                     seed=self.seed, pairs=True)

    def train_loader(self, per_rank_batch: int) -> torch.utils.data.DataLoader:
        return self.shuffled_loader(self._dataset(self.data.train_split, train=True), per_rank_batch)

    def _logits(self, model: nn.Module, batch: dict[str, Any]) -> Tensor:
        return pair_logits(model, self.head, self.tokenizer, batch["image"], batch["image2"], batch["text"],
                           self.dist.device)

    def forward_backward(self, model: nn.Module, batch: dict[str, Any], micro_batches: int, autocast,
                         loss_scale: float = 1.0, scaler=None) -> dict[str, float]:
        if micro_batches != 1:
            raise VlkitError("task nlvr2: use grad_accum=1")
        with autocast:
            logits = self._logits(model, batch)
        return self.backward_classes(logits, batch["label"], loss_scale, scaler)

    def save_beside(self, directory: str | Path) -> Path:
        """Write the head beside a saved model as ``nlvr2_head.safetensors`` (a temporary name, then renamed)."""
        from safetensors.torch import save

        from vlkit.utils.fs import atomic_write

        state = {k: v.detach().float().cpu().contiguous() for k, v in self.head.state_dict().items()}
        return atomic_write(Path(directory) / HEAD_NAME, save(state, metadata={"task": "nlvr2"}))

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
                predicted = self._logits(inner, batch).argmax(-1).cpu()
            rows.extend(zip(batch["index"].tolist(), predicted.tolist(), batch["label"].tolist()))
        inner.train(was_training)
        self.head.train(head_training)
        merged = {index: (p, y) for part in all_gather_objects(rows) for index, p, y in part}
        correct = sum(p == y for p, y in merged.values())
        return {f"val/{self.key}/accuracy": 100.0 * correct / max(1, len(merged))}
