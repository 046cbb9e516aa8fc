"""Training a VQ-VAE image tokenizer (``vqvae-*`` models) on the images of a dataset, captions not needed.

The loss is the reconstruction error (MSE on normalised pixels) plus the model's ``commitment`` weight times the
commitment loss (see :func:`vlkit.models.vqvae.vqvae_loss`); the codebook moves by its moving averages. Training
logs ``mse``, code ``usage`` and ``perplexity`` of each batch; validation reports, over the whole split,

- ``val/<key>/mse``: the mean squared reconstruction error on the normalised scale (the training objective),
- ``val/<key>/psnr``: peak signal-to-noise ratio in dB on ``[0, 1]`` pixels (the reconstruction clamped),
- ``val/<key>/code_usage``: the share of the codes that some token of the split uses,
- ``val/<key>/perplexity``: ``exp(entropy)`` of the split's code histogram.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vlkit.errors import VlkitError
from vlkit.modules.layers.codebook import code_statistics
from vlkit.tasks import register_task
from vlkit.tasks.image_only import ImageOnlyTask
from vlkit.train.distributed import all_gather_objects, unwrap


def require_vqvae(model: nn.Module) -> nn.Module:
    """The bare VQ-VAE inside ``model`` (DDP, compile), or an error naming the model's class."""
    from vlkit.models.vqvae.model import VQVAE

    inner = unwrap(model)
    if not isinstance(inner, VQVAE):
        raise VlkitError(f"task vqvae trains a VQ-VAE (model vqvae-*), not {type(inner).__name__}")
    return inner


def psnr(mse_pixels: float) -> float:
    """PSNR in dB of a mean squared error on ``[0, 1]`` pixels (infinite for a perfect reconstruction)."""
    return math.inf if mse_pixels <= 0 else 10.0 * math.log10(1.0 / mse_pixels)


@register_task("vqvae")
class VQVAETask(ImageOnlyTask):
    """Reconstruction + commitment loss of a VQ-VAE; see the module docstring."""

    def step_loss(self, model: nn.Module, images: torch.Tensor, autocast) -> tuple[torch.Tensor, dict[str, float]]:
        from vlkit.models.vqvae.model import vqvae_loss

        inner = require_vqvae(model)
        with autocast:
            out = model(images)
        loss, mse = vqvae_loss(out, images, inner.config.commitment)
        return loss, {"loss": float(loss.detach()), "mse": float(mse.detach()), "usage": float(out.usage),
                      "perplexity": float(out.perplexity), "restarted_codes": float(out.restarted)}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, autocast, batch_size: int = 64) -> dict[str, float]:
        if not self.data.val_split:
            return {}
        inner = require_vqvae(model)
        mean = torch.tensor(self.preprocess.mean, device=self.dist.device).view(1, 3, 1, 1)
        std = torch.tensor(self.preprocess.std, device=self.dist.device).view(1, 3, 1, 1)
        sq_norm = sq_pixels = 0.0
        values = 0
        counts = torch.zeros(inner.num_codes, dtype=torch.long)
        for images in self.validation_batches(model, batch_size):
            with autocast:
                out = inner(images)
            recon = out.reconstruction.float()
            sq_norm += float(((recon - images) ** 2).sum())
            pixels, recon_pixels = images * std + mean, (recon * std + mean).clamp(0, 1)
            sq_pixels += float(((recon_pixels - pixels) ** 2).sum())
            values += images.numel()
            counts += torch.bincount(out.ids.flatten().cpu(), minlength=inner.num_codes)
        parts = all_gather_objects((sq_norm, sq_pixels, values, counts))
        sq_norm, sq_pixels = sum(p[0] for p in parts), sum(p[1] for p in parts)
        values = sum(p[2] for p in parts)
        counts = torch.stack([p[3] for p in parts]).sum(0)
        if not values:
            return {}
        usage, perplexity = code_statistics(counts)
        prefix = f"val/{self.key}/"
        return {f"{prefix}mse": sq_norm / values, f"{prefix}psnr": psnr(sq_pixels / values),
                f"{prefix}code_usage": float(usage), f"{prefix}perplexity": float(perplexity)}
