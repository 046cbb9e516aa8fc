"""What the trainer needs for model FLOPs utilisation: the FLOPs a step costs per sample, measured once, and the
MFU of a logged throughput (see :mod:`vlkit.utils.flops`)."""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlkit.config.schema import TrainConfig
from vlkit.utils.flops import mfu, synthetic_batch, train_flops_per_sample


def step_head(model: nn.Module, task_names: Sequence[str]) -> str:
    """Which forward the training step runs, for counting: ``contrastive`` or ``pretrain``.

    A fusion model trained only on retrieval runs its contrastive forward (ALBEF's two towers); one with an
    ``itm`` task, or one without a two-tower forward (ViLT), its pre-training losses. Other fusion tasks (VQA,
    classification) are counted as pre-training too: an approximation (their heads differ).
    """
    if not hasattr(model, "pretrain_losses"):
        return "contrastive"
    if hasattr(model, "encode_image") and all(name == "retrieval" for name in task_names):
        return "contrastive"
    return "pretrain"


def measure_step_flops(model: nn.Module, cfg: TrainConfig, device: torch.device) -> float | None:
    """Forward + backward FLOPs per sample of ``model`` on a 2-sample synthetic batch, or None with a warning.

    Call on the unwrapped model before activation checkpointing is switched on (recomputation is not model
    work). Never raises: a model the counter cannot run only loses its MFU.
    """
    try:
        if _is_video_classifier(model):  # clips in, class logits out: a cross-entropy step on random clips
            flops = train_flops_per_sample(model, [_random_clips(model, device)], loss_fn=_video_loss)
        else:
            batch = synthetic_batch(model, batch_size=2, device=device)
            flops = train_flops_per_sample(model, batch, head=step_head(model, [t.name for t in cfg.tasks]))
    except Exception as exc:  # noqa: BLE001 - MFU is a diagnostic; training goes on without it
        warnings.warn(f"could not count the FLOPs of {cfg.model.name} ({type(exc).__name__}: {exc}); "
                      "train/mfu will not be logged", stacklevel=2)
        return None
    return flops if flops > 0 else None


def _is_video_classifier(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return getattr(config, "frames", None) is not None and getattr(config, "num_classes", 0) > 0 \
        and not hasattr(model, "encode_text")


def _random_clips(model: nn.Module, device: torch.device, batch_size: int = 2) -> torch.Tensor:
    config = model.config
    gen = torch.Generator().manual_seed(0)
    size = config.image_size
    return torch.randn(batch_size, config.frames, 3, size, size, generator=gen).to(device)


def _video_loss(model: nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
    logits = model(batch[0])
    return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device))


def step_mfu(flops_per_sample: float | None, samples_per_second: float, peak: float | None, world_size: int,
             tasks_per_step: int = 1) -> float | None:
    """MFU of a run: ``flops_per_sample x tasks_per_step x global samples/s / (peak x world_size)``.

    Args:
        flops_per_sample: one task's forward + backward FLOPs per sample.
        samples_per_second: the global throughput the trainer logs (``batch_size`` samples per step).
        peak: one device's peak FLOP/s.
        world_size: devices sharing the work.
        tasks_per_step: batches of ``batch_size`` samples a step runs (every task under ``sampling: all``).
    """
    if flops_per_sample is None or peak is None:
        return None
    return mfu(flops_per_sample * tasks_per_step, samples_per_second, peak * world_size)
