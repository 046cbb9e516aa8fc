"""FLOPs of a training step, accelerator peaks and model FLOPs utilisation (MFU).

FLOPs are counted by :class:`torch.utils.flop_counter.FlopCounterMode` on an example batch: matrix products,
convolutions and attention (one multiply-add = 2 FLOPs); element-wise work (norms, activations, softmax) and
embedding lookups are not counted, as is usual for MFU. Attention counts the full score matrix, causal or not.

MFU = achieved model FLOP/s / peak FLOP/s, where the achieved rate is FLOPs per sample x samples per second.
Measure the FLOPs without activation checkpointing: its recomputed forward is not model FLOPs.

Example:
    >>> per_sample = train_flops_per_sample(model, batch)          # forward + backward
    >>> mfu(per_sample, samples_per_second=850.0, peak=peak_flops("cuda"))
"""

from __future__ import annotations

import random
import re
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

#: Dense bf16 peak FLOP/s (tensor cores, without 2:4 sparsity) per device name, most specific first; a key
#: matches a whole word of ``torch.cuda.get_device_name()`` (so ``A10`` is not an ``A100`` or an ``A10G``).
#: Sources: NVIDIA's product datasheets, whose headline bf16 figures are "with sparsity" and twice the dense
#: ones: H100 SXM 1,979 -> 989.4 TFLOP/s; H100 PCIe 1,513 -> 756; H200 SXM has the H100 SXM's compute (989.4);
#: A100 312 dense (624 sparse); L4 242 -> 121; A10 250 -> 125.
PEAK_BF16_FLOPS: dict[str, float] = {
    "H100 PCIe": 756e12,
    "H100": 989.4e12,  # SXM: its device name reads "NVIDIA H100 80GB HBM3"
    "H200": 989.4e12,
    "A100": 312e12,
    "L4": 121e12,
    "A10": 125e12,
}
#: Variants whose clocks (and so peaks) differ from their family's entry and are not listed: no peak is
#: guessed for them (give one with ``peak_flops``'s ``override`` / the ``peak_flops`` config field).
_UNLISTED_VARIANTS = ("NVL",)


def _cpu_flash_attention(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_attention_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                                  **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _extra_formulas() -> dict[Any, Any]:
    """Counting rules ``FlopCounterMode`` lacks: the fused CPU attention kernels (counted as the GPU ones are)."""
    aten = torch.ops.aten
    extra = {}
    for name, formula in (("_scaled_dot_product_flash_attention_for_cpu", _cpu_flash_attention),
                          ("_scaled_dot_product_flash_attention_for_cpu_backward", _cpu_flash_attention_backward)):
        op = getattr(aten, name, None)
        if op is not None and op not in flop_counter.flop_registry:
            extra[op] = formula
    return extra


# ---------------------------------------------------------------------------------------------- example inputs
def _unpack(batch: Mapping[str, Tensor] | Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor | None]:
    if isinstance(batch, Mapping):
        return batch["image"], batch["input_ids"], batch.get("attention_mask")
    images, input_ids, *rest = batch
    return images, input_ids, rest[0] if rest else None


def _first_tensor(batch: Any) -> Tensor:
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else [batch]
    for value in values:
        if isinstance(value, Tensor):
            return value
    raise ValueError("the batch holds no tensor to take the batch size from")


def _end_token_id(model: nn.Module) -> int:
    """An id that every text tower of ``model`` reads as the end of the text: the configured end-of-text id
    where one is set, else the largest id of the largest embedding table (CLIP pools at the highest id)."""
    for module in model.modules():
        eos = getattr(getattr(module, "config", None), "eos_token_id", None)
        if isinstance(eos, int):
            return eos
    sizes = [m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)]
    return max(sizes, default=2) - 1


def synthetic_batch(model: nn.Module, batch_size: int = 2, device: torch.device | str | None = None,
                    seed: int = 0) -> dict[str, Tensor]:
    """A random batch in the shapes ``model.preprocess`` asks for, every text position used.

    The text ends at the last position with an end-of-text id (see :func:`_end_token_id`), so a text tower that
    stops at the end-of-text token still computes all ``context_length`` positions: the FLOPs measured on it are
    those of the longest texts. Uses its own generator; the global RNG is untouched.

    Args:
        model: a vlkit model with a ``preprocess`` (:class:`~vlkit.models.preprocess.Preprocess`).
        batch_size: samples.
        device: where the tensors go (default: the device of the model's first parameter).
        seed: seed of the batch's generator.

    Returns:
        ``{"image": [batch, 3, H, W], "input_ids": [batch, L], "attention_mask": [batch, L]}``.
    """
    if device is None:
        device = next(model.parameters()).device
    pre = model.preprocess
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, pre.image_size, pre.image_size, generator=gen)
    end = _end_token_id(model)
    # ordinary ids below the end id and away from the special ids at the bottom of BERT-style vocabularies
    low = min(1000, end // 2)
    ids = torch.randint(max(1, low), max(2, end), (batch_size, pre.context_length), generator=gen)
    ids[:, -1] = end
    mask = torch.ones_like(ids)
    return {"image": images.to(device), "input_ids": ids.to(device), "attention_mask": mask.to(device)}


# ---------------------------------------------------------------------------------------------- counting
def _default_head(model: nn.Module) -> str:
    return "pretrain" if hasattr(model, "pretrain_losses") else "contrastive"


def _step_loss(model: nn.Module, images: Tensor, input_ids: Tensor, mask: Tensor | None, head: str) -> Tensor:
    """The scalar training loss of one batch: ITC for two-tower models, the pre-training losses for fusion ones."""
    if head == "pretrain":
        return model(images, input_ids, mask, head="pretrain").loss
    if head != "contrastive":
        raise ValueError(f"head must be 'contrastive' or 'pretrain', got {head!r}")
    from vlkit.modules.losses.contrastive import contrastive_loss

    out = model(images, input_ids, mask)
    if not hasattr(out, "image_embeds"):
        raise ValueError(f"{type(model).__name__}(images, input_ids, mask) returned {type(out).__name__}, "
                         "not image and text embeddings; use head='pretrain'")
    return contrastive_loss(out.image_embeds.float(), out.text_embeds.float(), out.logit_scale).loss


class _Preserved:
    """Restores on exit what measuring could change: RNG states, gradients, buffers, train/eval flags."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self) -> "_Preserved":
        m = self.model
        self.rng = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
                    torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None)
        self.grads = [(p, p.grad) for p in m.parameters()]
        for p, _ in self.grads:
            p.grad = None
        # momentum queues and their pointers, batch-norm statistics
        self.buffers = [(b, b.detach().clone()) for b in m.buffers()]
        self.modes = [(module, module.training) for module in m.modules()]
        return self

    def __exit__(self, *exc: Any) -> None:
        with torch.no_grad():
            for buf, saved in self.buffers:
                buf.copy_(saved)
        for p, grad in self.grads:
            p.grad = grad
        for module, training in self.modes:
            module.training = training
        python, numpy, cpu, cuda = self.rng
        random.setstate(python)
        np.random.set_state(numpy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def train_flops_per_sample(model: nn.Module, batch: Mapping[str, Tensor] | Sequence[Tensor], *,
                           backward: bool = True, head: str | None = None,
                           loss_fn: Callable[[nn.Module, Any], Tensor] | None = None) -> float:
    """FLOPs of one training step's forward (and backward) per sample; the optimizer step is not included.

    Runs the model in training mode on ``batch`` under :class:`~torch.utils.flop_counter.FlopCounterMode`: the
    forward, the loss, and with ``backward`` its backward. The model comes back as it was: parameters,
    gradients, buffers (momentum queues, batch-norm statistics), train/eval flags and the global RNG states
    (python, numpy, torch, CUDA) are restored. Random choices inside the step (dropout, masking) use a fixed
    seed, so the count is repeatable. Frozen parameters get no weight gradients, so they cost less backward.

    Args:
        model: a vlkit model, not wrapped (DDP/FSDP/compile wrappers would add or hide work).
        batch: ``{"image", "input_ids", "attention_mask"}`` or ``(images, input_ids[, attention_mask])``,
            on the model's device.
        backward: count the backward too (False: forward and loss only).
        head: ``contrastive`` (the symmetric contrastive loss of ``model(images, input_ids, mask)``, a
            :class:`~vlkit.models.outputs.TwoTowerOutput`) or ``pretrain`` (``model(..., head="pretrain").loss``
            of a fusion model); None: ``pretrain`` for models with ``pretrain_losses`` (ALBEF, ViLT), else
            ``contrastive``.
        loss_fn: ``loss_fn(model, batch)`` -> scalar loss, instead of ``head`` (any module and batch; the
            batch size is then the first dimension of the batch's first tensor).

    Returns:
        FLOPs per sample (total / batch size).

    Raises:
        ValueError: an unknown head, or a model whose output has no embeddings under ``contrastive``.
    """
    if loss_fn is None:
        images, input_ids, mask = _unpack(batch)
        head = head or _default_head(model)

        def loss_fn(model: nn.Module, batch: Any) -> Tensor:
            return _step_loss(model, images, input_ids, mask, head)

    batch_size = _first_tensor(batch).shape[0]
    counter = FlopCounterMode(display=False, custom_mapping=_extra_formulas())
    with _Preserved(model):
        model.train()
        torch.default_generator.manual_seed(0)  # not torch.manual_seed: it would queue a seed for CUDA too
        if torch.cuda.is_initialized():
            torch.cuda.manual_seed_all(0)
        with torch.set_grad_enabled(backward), counter:
            loss = loss_fn(model, batch)
            if backward and loss.requires_grad:
                loss.backward()
    return counter.get_total_flops() / batch_size


def forward_flops_per_sample(model: nn.Module, batch: Mapping[str, Tensor] | Sequence[Tensor], *,
                             head: str | None = None,
                             loss_fn: Callable[[nn.Module, Any], Tensor] | None = None) -> float:
    """FLOPs per sample of the training forward and loss alone (no gradients); see
    :func:`train_flops_per_sample`."""
    return train_flops_per_sample(model, batch, backward=False, head=head, loss_fn=loss_fn)


# ---------------------------------------------------------------------------------------------- peaks and MFU
def peak_flops(device: torch.device | str | None = None, override: float | None = None) -> float | None:
    """Dense bf16 peak FLOP/s of one device.

    Args:
        device: a CUDA device (its name is matched against :data:`PEAK_BF16_FLOPS`), a CPU, or None (the
            current CUDA device when there is one, else the CPU).
        override: the peak to use instead of the table (a CPU, or an accelerator the table lacks).

    Returns:
        ``override`` when given; for a listed CUDA device its table value; None otherwise. A CPU has no
        published bf16 peak that holds across models (it depends on core count, clocks, vector units and
        AMX), so a CPU's MFU is only reported with an ``override``.
    """
    if override is not None:
        return float(override)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return _table_peak(torch.cuda.get_device_name(device))


def _table_peak(name: str) -> float | None:
    """The :data:`PEAK_BF16_FLOPS` entry of a device name, or None."""
    if any(re.search(rf"\b{v}\b", name, re.IGNORECASE) for v in _UNLISTED_VARIANTS):
        return None
    for key, value in PEAK_BF16_FLOPS.items():
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", name, re.IGNORECASE):
            return value
    return None


def mfu(flops_per_sample: float, samples_per_second: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: ``flops_per_sample * samples_per_second / peak``, a fraction of 1.

    ``peak`` is the peak of all devices that produced ``samples_per_second`` together (one device's peak x
    world size for a global throughput). None when ``peak`` is None.
    """
    if peak is None:
        return None
    return flops_per_sample * samples_per_second / peak
