"""BEiT-style masked image modelling (``beit-*`` models): a random share of each image's patches (the model's
``mask_ratio``, drawn as MAE draws it: :func:`vlkit.modules.layers.masking.random_patch_mask`) is replaced by
the mask token, and the model predicts the token ids a trained VQ-VAE tokenizer (the task's ``tokenizer_run``)
gives those patches; cross-entropy on the masked positions only. Captions are not needed.

Validation masks every image with a fixed seed and reports, over the masked tokens of the whole split,
``val/<key>/masked_accuracy`` (percent), ``val/<key>/masked_loss`` and ``val/<key>/majority_accuracy``: the
accuracy of always answering the split's most frequent masked token (what a model that ignores the image gets).
"""

from __future__ import annotations

import collections

import torch
import torch.nn.functional as F
from torch import nn

from vlkit.config.schema import DatasetConfig, TaskConfig
from vlkit.errors import VlkitError
from vlkit.modules.layers.masking import random_patch_mask
from vlkit.tasks import register_task
from vlkit.tasks.image_only import ImageOnlyTask
from vlkit.train.distributed import DistInfo, all_gather_objects, unwrap

VAL_MASK_SEED = 1234  # every validation masks the same patches


def require_beit(model: nn.Module) -> nn.Module:
    """The bare BEiT inside ``model`` (DDP, compile), or an error naming the model's class."""
    from vlkit.models.beit.model import BEiT

    inner = unwrap(model)
    if not isinstance(inner, BEiT):
        raise VlkitError(f"task beit trains a BEiT (model beit-*), not {type(inner).__name__}")
    return inner


def tokenizer_problem(beit: nn.Module, tokenizer: nn.Module) -> str | None:
    """Why ``tokenizer`` (a VQ-VAE) cannot give ``beit`` its targets, or None when it can: the vocabularies
    must be the same size and the token grid (at the tokenizer's own image size) the patch grid."""
    if beit.config.vocab_size != tokenizer.num_codes:
        return f"the tokenizer has {tokenizer.num_codes} codes but the model predicts {beit.config.vocab_size}"
    side = beit.preprocess.image_size // beit.config.vision.patch_size
    grid = tokenizer.token_grid()
    if grid != (side, side):
        return (f"the tokenizer cuts a {tokenizer.preprocess.image_size} px image into {grid[0]}x{grid[1]} tokens "
                f"but the model's patch grid is {side}x{side} ({beit.preprocess.image_size} px, "
                f"patch {beit.config.vision.patch_size})")
    return None


def tokenizer_images(images: torch.Tensor, source, target) -> torch.Tensor:
    """Images normalised by the preprocessing ``source`` -> as the preprocessing ``target`` expects them (its
    normalisation and image size)."""
    dev = images.device
    mean_s, std_s = (torch.tensor(v, device=dev).view(1, 3, 1, 1) for v in (source.mean, source.std))
    mean_t, std_t = (torch.tensor(v, device=dev).view(1, 3, 1, 1) for v in (target.mean, target.std))
    pixels = images.float() * std_s + mean_s
    if target.image_size != images.shape[-1] or target.image_size != images.shape[-2]:
        pixels = F.interpolate(pixels, size=(target.image_size, target.image_size), mode="bilinear",
                               antialias=True, align_corners=False)
    return (pixels - mean_t) / std_t


@register_task("beit")
class BEiTTask(ImageOnlyTask):
    """Masked-token prediction against a frozen VQ-VAE tokenizer; see the module docstring.

    Args: as :class:`vlkit.tasks.base.Task`; ``cfg.tokenizer_run`` names the tokenizer (a run or model folder).
    """

    def __init__(self, key: str, cfg: TaskConfig, data: DatasetConfig, tokenizer, preprocess, dist: DistInfo,
                 seed: int = 0, augment: bool = True):
        super().__init__(key, cfg, data, tokenizer, preprocess, dist, seed, augment)
        from vlkit.models.vqvae import load_vqvae

        if not cfg.tokenizer_run:
            raise VlkitError("task beit needs tokenizer_run: the run (or model folder) of a trained VQ-VAE")
        vq = load_vqvae(cfg.tokenizer_run).to(dist.device)
        for p in vq.parameters():
            p.requires_grad_(False)
        # kept out of the module tree: the frozen tokenizer is neither trained nor saved in checkpoints
        self.__dict__["vq"] = vq

    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """The tokenizer's ids ``[batch, patches]`` of images ``[batch, 3, H, W]`` (this model's preprocessing)."""
        vq = self.__dict__["vq"]
        return vq.encode(tokenizer_images(images, self.preprocess, vq.preprocess)).flatten(1)

    def step_loss(self, model: nn.Module, images: torch.Tensor, autocast) -> tuple[torch.Tensor, dict[str, float]]:
        from vlkit.models.beit.model import masked_token_loss

        inner = require_beit(model)
        targets = self.targets(images)  # [batch, patches]
        mask = random_patch_mask(images.shape[0], targets.shape[1], inner.config.mask_ratio,
                                 device=images.device).mask.bool()
        with autocast:
            logits = model(images, mask)
        loss, accuracy = masked_token_loss(logits, targets, mask)
        return loss, {"loss": float(loss.detach()), "masked_accuracy": float(accuracy) * 100}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, autocast, batch_size: int = 64) -> dict[str, float]:
        if not self.data.val_split:
            return {}
        inner = require_beit(model)
        gen = torch.Generator().manual_seed(VAL_MASK_SEED + self.dist.rank)
        correct, loss_sum, total = 0, 0.0, 0
        histogram: collections.Counter[int] = collections.Counter()
        for images in self.validation_batches(model, batch_size):
            targets = self.targets(images)
            mask = random_patch_mask(images.shape[0], targets.shape[1], inner.config.mask_ratio,
                                     generator=gen).mask.bool().to(images.device)
            with autocast:
                logits = inner(images, mask)
            picked, wanted = logits[mask].float(), targets[mask]
            correct += int((picked.argmax(-1) == wanted).sum())
            loss_sum += float(F.cross_entropy(picked, wanted, reduction="sum"))
            total += wanted.numel()
            histogram.update(wanted.cpu().tolist())
        parts = all_gather_objects((correct, loss_sum, total, histogram))
        correct, loss_sum = sum(p[0] for p in parts), sum(p[1] for p in parts)
        total = sum(p[2] for p in parts)
        merged: collections.Counter[int] = sum((p[3] for p in parts), collections.Counter())
        if not total:
            return {}
        prefix = f"val/{self.key}/"
        return {f"{prefix}masked_accuracy": 100.0 * correct / total, f"{prefix}masked_loss": loss_sum / total,
                f"{prefix}majority_accuracy": 100.0 * max(merged.values()) / total}
