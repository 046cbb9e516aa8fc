"""Image captioning: teacher-forced next-token training of a model with a text decoder, evaluated by writing
captions for the validation split and scoring them against its references (CIDEr-D, BLEU-4, ROUGE-L).

Training takes one random caption per image per epoch (a new draw every epoch) as ``[bos] prompt caption
[eos]`` (see :mod:`vlkit.inference.captions`); the loss is cross-entropy over the caption's tokens (not the
prompt's) with optional label smoothing. With ``loss: coca`` the same forward also gives both towers'
embeddings and the contrastive loss is added, weighted as the model's config says (CoCa: contrastive 1,
captioning 2), so one step trains retrieval and captioning.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from vlkit.config.schema import DatasetConfig, TaskConfig
from vlkit.data.dataset import LanceImageTextDataset, make_loader
from vlkit.data.sampler import DistributedEpochSampler
from vlkit.errors import VlkitError
from vlkit.inference.captions import caption_inputs, write_captions
from vlkit.inference.interface import require_generative
from vlkit.modules.losses.captioning import IGNORE_INDEX, caption_labels, caption_loss
from vlkit.modules.losses.distributed import distributed_contrastive_loss
from vlkit.tasks import register_task
from vlkit.tasks.base import Task
from vlkit.tasks.retrieval import _no_sync
from vlkit.train.distributed import unwrap
from vlkit.train.distributed import DistInfo, all_gather_objects


def generation_settings(cfg: TaskConfig) -> dict[str, Any]:
    """The decoding options a task config names (beams, caption length)."""
    return {"num_beams": cfg.num_beams, "max_new_tokens": cfg.max_new_tokens, "min_new_tokens": cfg.min_new_tokens,
            "no_repeat_ngram_size": cfg.no_repeat_ngram_size}


@register_task("captioning")
class CaptioningTask(Task):
    """Captioning on one dataset with captions; see the module docstring.

    Args: as :class:`vlkit.tasks.base.Task`.
    """

    def __init__(self, key: str, cfg: TaskConfig, data: DatasetConfig, tokenizer, preprocess, dist: DistInfo,
                 seed: int = 0, augment: bool = True):
        super().__init__(key, cfg, data, tokenizer, preprocess, dist, seed, augment)
        if (cfg.loss or "caption") not in ("caption", "coca"):
            raise VlkitError(f"task captioning: loss must be caption or coca, got {cfg.loss!r}")

    def dataset(self, split: str, train: bool) -> LanceImageTextDataset:
        transform = self.preprocess.image_transform(train=train and self.augment)
        return LanceImageTextDataset(self.data.path, split, transform, None, captions=self.cfg.captions if train else "all",
                                     seed=self.seed)

    def train_loader(self, per_rank_batch: int) -> torch.utils.data.DataLoader:
        return self.shuffled_loader(self.dataset(self.data.train_split, train=True), per_rank_batch)

    # ------------------------------------------------------------------ loss
    def forward_backward(self, model: nn.Module, batch: dict[str, Any], micro_batches: int, autocast,
                         loss_scale: float = 1.0, scaler=None) -> dict[str, float]:
        inner = require_generative(model)
        device = self.dist.device
        coca = self.cfg.loss == "coca"
        n = batch["image"].shape[0]
        if coca and micro_batches != 1:
            raise VlkitError("task captioning with loss coca: the contrastive part needs the whole batch; "
                             "use grad_accum=1")
        size = -(-n // micro_batches)
        logs = {"loss": 0.0, "caption_loss": 0.0, "token_acc": 0.0}
        starts = list(range(0, n, size))
        parts = []
        for start in starts:
            tokens = caption_inputs(self.tokenizer, inner.generation, batch["text"][start:start + size],
                                    self.cfg.prompt).to(device)
            parts.append((tokens, caption_labels(tokens.input_ids, tokens.attention_mask, tokens.prompt_length)))
        total = sum(int((labels != IGNORE_INDEX).sum()) for _, labels in parts)
        for k, (start, (tokens, labels)) in enumerate(zip(starts, parts)):
            # the loss is a mean over the batch's predicted tokens: weight each micro-batch by its share of them
            weight = int((labels != IGNORE_INDEX).sum()) / max(total, 1)
            images = batch["image"][start:start + size].to(device, non_blocking=True)
            sync = _no_sync(model) if k < len(starts) - 1 else contextlib.nullcontext()
            with sync:
                with autocast:
                    if coca:
                        out = model(images, tokens.input_ids, tokens.attention_mask, head="coca")
                        logits = out.logits
                    else:
                        logits = model(images, tokens.input_ids, tokens.attention_mask, head="caption")
                    cap = caption_loss(logits, labels, self.cfg.label_smoothing)
                    loss = cap.loss
                    if coca:
                        config = inner.config
                        contrastive = distributed_contrastive_loss(out.image_embeds.float(), out.text_embeds.float(),
                                                                   out.logit_scale).loss
                        loss = config.caption_loss_weight * cap.loss + config.contrastive_loss_weight * contrastive
                        logs["contrastive_loss"] = logs.get("contrastive_loss", 0.0) + float(contrastive.detach()) * weight
                scaled = loss * self.cfg.weight * loss_scale * weight
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            logs["loss"] += float(loss.detach()) * weight
            logs["caption_loss"] += float(cap.loss.detach()) * weight
            logs["token_acc"] += float(cap.accuracy) * weight
        return logs

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, model: nn.Module, autocast, batch_size: int = 32) -> dict[str, float]:
        """CIDEr-D, BLEU-4 and ROUGE-L of captions written for the validation split (its first
        ``eval_images`` images), every rank captioning its share."""
        from vlkit.metrics.captioning import caption_metrics

        if not self.data.val_split:
            return {}
        ds = self.dataset(self.data.val_split, train=False)
        if self.cfg.eval_images is not None:
            ds.offsets = ds.offsets[: self.cfg.eval_images]
        rows = caption_split(model, self.tokenizer, ds, self.dist, autocast, batch_size, self.cfg.prompt,
                             generation_settings(self.cfg))
        rows = [r for r in rows if r["references"]]
        if not rows:
            return {}
        m = caption_metrics([r["caption"] for r in rows], [r["references"] for r in rows], meteor=False)
        prefix = f"val/{self.key}/"
        return {f"{prefix}{name}": value for name, value in m.as_dict().items()}


def caption_split(model: nn.Module, tokenizer, ds: LanceImageTextDataset, dist: DistInfo, autocast,
                  batch_size: int = 32, prompt: str | None = None, settings: dict[str, Any] | None = None,
                  progress=None) -> list[dict[str, Any]]:
    """A caption for every image of ``ds`` (a dataset read with ``captions="all"``), in dataset order: dicts
    with ``index``, ``id``, ``caption``, ``score`` and ``references``.

    Args:
        progress: called with the number of images done after each batch (e.g. a progress bar's update).
    """
    inner = unwrap(model)
    require_generative(inner)
    sampler = DistributedEpochSampler(len(ds), dist.world_size, dist.rank, shuffle=False)
    loader = make_loader(ds, batch_size, sampler, num_workers=0)
    was_training = inner.training
    inner.eval()
    rows: list[dict[str, Any]] = []
    try:
        for batch in loader:
            images = batch["image"].to(dist.device)
            with autocast:
                written = write_captions(inner, tokenizer, images, prompt, **(settings or {}))
            owner = batch.get("caption_image")
            texts = batch.get("text", [])
            for pos, index in enumerate(batch["index"].tolist()):
                refs = [t for t, o in zip(texts, owner.tolist()) if o == pos] if owner is not None else []
                caption, score = written[pos][0]
                rows.append({"index": index, "id": batch["id"][pos], "caption": caption, "score": score,
                             "references": refs})
            if progress is not None:
                progress(len(batch["index"]))
    finally:
        inner.train(was_training)
    merged = {row["index"]: row for part in all_gather_objects(rows) for row in part}  # drops padding
    return [merged[k] for k in sorted(merged)]
