"""Image-text matching pre-training of fusion models (ALBEF, VLMo: ITC + ITM + MLM; BLIP, BLIP-2: ITC + ITM + LM;
ViLT: ITM + MLM).

Each step takes one random caption per image; the model computes its own losses (contrastive, matching with
hard negatives, masked language modelling or captioning) through ``forward(images, input_ids, attention_mask,
head="pretrain", group_ids=...)``, where images whose captions read the same are one group (positives of each
other, never drawn as each other's negatives). Evaluation reports matching accuracy on the validation split
(every image with its first caption, and with the first caption of the next image as a negative) and, for models
with separate towers (ALBEF, BLIP, BLIP-2, VLMo), retrieval recall@K as the retrieval task does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlkit.data.dataset import LanceImageTextDataset, make_loader
from vlkit.data.sampler import DistributedEpochSampler
from vlkit.errors import VlkitError
from vlkit.tasks import register_task
from vlkit.tasks.retrieval import RetrievalTask
from vlkit.train.distributed import unwrap
from vlkit.train.distributed import all_gather_objects


def text_groups(texts: list[str], device: torch.device | None = None) -> torch.Tensor | None:
    """Group ids ``[batch]`` under which images whose captions read the same (case and spacing aside) are
    positives of each other: an image with "a red circle" matches every other image captioned "a red circle", so
    such pairs are neither contrastive negatives nor drawn as ITM negatives. None when every caption differs, or
    when all are alike (no negative would be left).
    """
    first: dict[str, int] = {}
    ids = [first.setdefault(" ".join(t.lower().split()), i) for i, t in enumerate(texts)]
    if len(first) == len(ids) or len(first) < 2:
        return None
    return torch.tensor(ids, dtype=torch.long, device=device)


@register_task("itm")
class ITMTask(RetrievalTask):
    """Pre-training of a fusion model with its own losses; see the module docstring."""

    def forward_backward(self, model: nn.Module, batch: dict[str, Any], micro_batches: int, autocast,
                         loss_scale: float = 1.0, scaler=None) -> dict[str, float]:
        if micro_batches != 1:
            raise VlkitError("the itm task mines hard negatives inside the batch: use grad_accum=1")
        if not hasattr(unwrap(model), "pretrain_losses"):
            raise VlkitError(f"task itm needs a model with pre-training losses (albef-*, blip-*, blip2-*, vlmo-*, "
                             f"vilt-*), not {type(unwrap(model)).__name__}")
        groups = text_groups(batch["text"], self.dist.device)
        with autocast:
            out = model(*self._inputs(batch, self.dist.device), head="pretrain", group_ids=groups)
        self._backward(out.loss * self.cfg.weight * loss_scale, scaler)
        logs = {"loss": float(out.loss.detach())}
        for name in ("itc", "itm", "mlm", "lm", "mim", "itm_accuracy"):
            value = getattr(out, name, None)
            if value is not None:
                logs[name] = float(value.detach() if torch.is_tensor(value) else value)
        return logs

    @torch.no_grad()
    def evaluate(self, model: nn.Module, autocast, batch_size: int = 64) -> dict[str, float]:
        if not self.data.val_split:
            return {}
        inner = unwrap(model)
        metrics = super().evaluate(model, autocast, batch_size) if hasattr(inner, "encode_image") else {}
        metrics[f"val/{self.key}/itm_acc"] = self._itm_accuracy(inner, autocast, batch_size)
        return metrics

    def _itm_accuracy(self, inner: nn.Module, autocast, batch_size: int) -> float:
        ds = LanceImageTextDataset(self.data.path, self.data.val_split, self.preprocess.image_transform(train=False),
                                   self.tokenizer, captions="first")
        sampler = DistributedEpochSampler(len(ds), self.dist.world_size, self.dist.rank, shuffle=False)
        was_training = inner.training
        inner.eval()
        rows = []
        for batch in make_loader(ds, batch_size, sampler, num_workers=0):
            images, ids, mask = self._inputs(batch, self.dist.device)
            if len(images) < 2:
                continue
            with autocast:
                pos = inner.itm_scores(images, ids, mask).float()
                neg = inner.itm_scores(images, ids.roll(1, 0), mask.roll(1, 0)).float()
            texts = batch["text"]
            for j, index in enumerate(batch["index"].tolist()):
                same = texts[j] == texts[(j - 1) % len(texts)]  # a repeated caption is no negative
                rows.append((index, int(pos[j] > 0.5), None if same else int(neg[j] <= 0.5)))
        inner.train(was_training)
        merged = {index: (p, n) for part in all_gather_objects(rows) for index, p, n in part}
        right = sum(p for p, _ in merged.values()) + sum(n for _, n in merged.values() if n is not None)
        total = len(merged) + sum(1 for _, n in merged.values() if n is not None)
        return 100.0 * right / max(1, total)
