"""Image-text retrieval: contrastive training of a two-tower model and recall@K evaluation.

With gradient accumulation the loss still sees every micro-batch's negatives: embeddings of all micro-batches
are computed first without gradients, the loss over the whole batch gives gradients for the embeddings, then
each micro-batch is recomputed with gradients and back-propagated from those (gradient caching, Gao et al.
2021). Random states are replayed so that the recomputation equals the first pass.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn

from vlkit.config.schema import DatasetConfig, TaskConfig
from vlkit.data.dataset import LanceImageTextDataset, make_loader
from vlkit.data.sampler import DistributedEpochSampler
from vlkit.errors import VlkitError
from vlkit.metrics.registry import compute_metrics
from vlkit.metrics.retrieval import retrieval_metrics
from vlkit.modules.losses.distributed import distributed_contrastive_loss, gather_with_grad
from vlkit.modules.losses.registry import get_loss
from vlkit.modules.losses.siglip import SiglipLoss
from vlkit.tasks import register_task
from vlkit.tasks.base import Task
from vlkit.train.distributed import DistInfo, all_gather_objects, unwrap


def _slice_batch(batch: dict[str, Any], start: int, end: int) -> dict[str, Any]:
    return {k: v[start:end] for k, v in batch.items()}


@register_task("retrieval")
class RetrievalTask(Task):
    """Contrastive image-text training on one dataset, evaluated by retrieval recall@1/5/10.

    Args: as :class:`vlkit.tasks.base.Task`.
    """

    def __init__(self, key: str, cfg: TaskConfig, data: DatasetConfig, tokenizer, preprocess, dist: DistInfo,
                 seed: int = 0, augment: bool = True):
        super().__init__(key, cfg, data, tokenizer, preprocess, dist, seed, augment)
        self.siglip = SiglipLoss() if cfg.loss == "siglip" else None
        # a plug-in loss (vlkit.modules.losses.registry): fn(image_embeds, text_embeds, scale) over the whole batch
        # (a task built on this one, registered under another name, finds the losses registered for that name)
        self.loss_fn = get_loss(cfg.name, cfg.loss).fn if cfg.loss is not None else None

    # ------------------------------------------------------------------ data
    def train_loader(self, per_rank_batch: int) -> torch.utils.data.DataLoader:
        transform = self.preprocess.image_transform(train=self.augment)
        ds = LanceImageTextDataset(self.data.path, self.data.train_split, transform, self.tokenizer,
                                   captions=self.cfg.captions, seed=self.seed)
        return self.shuffled_loader(ds, per_rank_batch)

    # ------------------------------------------------------------------ loss
    def loss_from_embeddings(self, model: nn.Module, image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
        if self.cfg.loss == "siglip":
            img, txt = gather_with_grad(image_embeds), gather_with_grad(text_embeds)
            return self.siglip(img, txt).loss
        if self.loss_fn is not None:
            out = self.loss_fn(gather_with_grad(image_embeds), gather_with_grad(text_embeds), unwrap(model).scale())
            return getattr(out, "loss", out)
        scale = unwrap(model).scale()
        return distributed_contrastive_loss(image_embeds, text_embeds, scale, local_loss=self.cfg.local_loss).loss

    def _inputs(self, batch: dict[str, Any], device: torch.device):
        return (batch["image"].to(device, non_blocking=True), batch["input_ids"].to(device, non_blocking=True),
                batch["attention_mask"].to(device, non_blocking=True))

    def forward_backward(self, model: nn.Module, batch: dict[str, Any], micro_batches: int, autocast,
                         loss_scale: float = 1.0, scaler=None) -> dict[str, float]:
        """Forward and backward of one optimizer step's batch; returns logged values."""
        device = self.dist.device
        if self.cfg.loss == "momentum":
            if micro_batches != 1:
                raise VlkitError("the momentum loss keeps its own queue of negatives: use grad_accum=1")
            with autocast:
                out = model(*self._inputs(batch, device))
                loss = unwrap(model).queue(out.image_embeds, out.text_embeds, out.image_embeds_m,
                                           out.text_embeds_m).loss
            self._backward(loss * self.cfg.weight * loss_scale, scaler)
            return {"loss": float(loss.detach())}
        if micro_batches == 1:
            with autocast:
                out = model(*self._inputs(batch, device))
                loss = self.loss_from_embeddings(model, out.image_embeds.float(), out.text_embeds.float())
            self._backward(loss * self.cfg.weight * loss_scale, scaler)
            return {"loss": float(loss.detach())}
        return self._cached_step(model, batch, micro_batches, autocast, loss_scale, scaler)

    def _backward(self, loss: Tensor, scaler) -> None:
        (scaler.scale(loss) if scaler is not None else loss).backward()

    def _cached_step(self, model, batch, micro_batches, autocast, loss_scale, scaler) -> dict[str, float]:
        n = batch["image"].shape[0]
        if n % micro_batches:
            raise VlkitError(f"per-rank batch {n} is not divisible by grad_accum={micro_batches}")
        size = n // micro_batches
        parts = [_slice_batch(batch, i * size, (i + 1) * size) for i in range(micro_batches)]
        states, images, texts = [], [], []
        with torch.no_grad():
            for part in parts:
                states.append(_rng_state())
                with autocast:
                    out = model(*self._inputs(part, self.dist.device))
                images.append(out.image_embeds.float())
                texts.append(out.text_embeds.float())
        img = torch.cat(images).requires_grad_(True)
        txt = torch.cat(texts).requires_grad_(True)
        loss = self.loss_from_embeddings(model, img, txt)
        self._backward(loss * self.cfg.weight * loss_scale, scaler)
        after = _rng_state()
        for i, part in enumerate(parts):
            _set_rng_state(states[i])
            sync = _no_sync(model) if i < micro_batches - 1 else contextlib.nullcontext()
            with sync:
                with autocast:
                    out = model(*self._inputs(part, self.dist.device))
                sl = slice(i * size, (i + 1) * size)
                outputs = [out.image_embeds.float(), out.text_embeds.float(), out.logit_scale]
                grads = [img.grad[sl], txt.grad[sl], torch.zeros_like(out.logit_scale)]
                torch.autograd.backward(outputs, grads)
        _set_rng_state(after)
        return {"loss": float(loss.detach())}

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, model: nn.Module, autocast, batch_size: int = 64) -> dict[str, float]:
        """Recall@1/5/10 both ways on the validation split, embeddings gathered from every rank."""
        if not self.data.val_split:
            return {}
        transform = self.preprocess.image_transform(train=False)
        ds = LanceImageTextDataset(self.data.path, self.data.val_split, transform, self.tokenizer, captions="all")
        sampler = DistributedEpochSampler(len(ds), self.dist.world_size, self.dist.rank, shuffle=False)
        loader = make_loader(ds, batch_size, sampler, num_workers=0)
        inner = unwrap(model)
        was_training = inner.training
        inner.eval()
        rows: list[tuple[int, Tensor, Tensor]] = []
        for batch in loader:
            images, ids, mask = self._inputs(batch, self.dist.device)
            with autocast:
                img = inner.encode_image(images).float().cpu()
                txt = inner.encode_text(ids, mask).float().cpu()
            for j, index in enumerate(batch["index"].tolist()):
                rows.append((index, img[j], txt[batch["caption_image"] == j]))
        inner.train(was_training)
        merged = {index: (i, t) for part in all_gather_objects(rows) for index, i, t in part}  # drops padding
        order = sorted(merged)
        image_embeds = torch.stack([merged[k][0] for k in order])
        text_embeds = torch.cat([merged[k][1] for k in order])
        owner = torch.cat([torch.full((len(merged[k][1]),), n) for n, k in enumerate(order)])
        metrics = retrieval_metrics(image_embeds, text_embeds, owner)
        out = {f"val/{self.key}/{name}": float(v) for name, v in metrics.as_dict().items()}
        if self.cfg.metrics:  # registered metrics (vlkit.metrics.registry) over the same predictions
            predictions = {"image_embeds": image_embeds, "text_embeds": text_embeds, "text_image": owner}
            out.update(compute_metrics(self.cfg.name, self.cfg.metrics, predictions, f"val/{self.key}/"))
        return out

    def state(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict() if self.sampler is not None else None}


def _rng_state() -> tuple:
    return torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def _set_rng_state(state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def _no_sync(model: nn.Module):
    if hasattr(model, "no_sync"):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        @contextlib.contextmanager
        def ctx():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)
        return ctx()
    return contextlib.nullcontext()
