"""How inference runs fast on a CPU (and a GPU): precision, memory format, and decoding beside the model.

Three measures, each with a switch so that the plain path stays one option away:

- **bf16 autocast** where the hardware computes in bf16 natively (x86 CPUs with AVX512-BF16 or AMX, CUDA GPUs
  with bf16): matrix products and convolutions run in bf16, reductions and normalisations in fp32 as autocast
  decides; outputs come back as fp32. ``precision="auto"`` picks it only on such hardware.
- **channels-last convolutions**: the convolution weights and the input batch in NHWC layout, which oneDNN and
  cuDNN run faster.
- **batch norms folded** into the convolutions they follow (found by watching one forward pass, and checked to
  move the output by no more than 1e-4).

The model is prepared for the duration of a call and restored afterwards (the original parameter objects put
back), so a model that is also being trained is left exactly as it was.
- **decoding beside the model**: a background thread pulls the next batches from the loader (JPEG decoding and
  resizing release the GIL) while the model runs on the current one.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from typing import Any, Callable, Iterable, Iterator, Literal

import torch
from torch import nn

from vlkit.errors import VlkitError

Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS = ("auto", "fp32", "bf16")


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` computes in bf16 natively (not emulated, which is slower than fp32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(check()) for check in checks if callable(check))


def resolve_precision(precision: str, device: torch.device | str = "cpu") -> str:
    """``auto`` -> ``bf16`` on hardware with native bf16, else ``fp32``; ``fp32``/``bf16`` as given.

    Raises:
        VlkitError: an unknown precision.
    """
    if precision not in PRECISIONS:
        raise VlkitError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def autocast(precision: str, device: torch.device | str = "cpu") -> contextlib.AbstractContextManager:
    """The autocast context for a resolved ``precision`` (``fp32``: none)."""
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def has_convolutions(model: nn.Module) -> bool:
    """Whether ``model`` holds 2-d convolutions (the only layers channels-last changes)."""
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def _parents(model: nn.Module) -> dict[nn.Module, tuple[nn.Module, str]]:
    """Each submodule's parent and its name there."""
    return {child: (parent, name) for parent in model.modules() for name, child in parent._modules.items()
            if child is not None}


def _conv_bn_pairs(model: nn.Module, run: Callable[[], Any]) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """The (convolution, batch norm) pairs where the batch norm takes exactly the convolution's output, found by
    watching one forward pass (``run``)."""
    produced: dict[int, tuple[torch.Tensor, nn.Conv2d]] = {}  # the outputs are held, so no id is reused
    pairs: dict[nn.BatchNorm2d, nn.Conv2d | None] = {}
    hooks = []

    def after_conv(module, _inputs, output) -> None:
        produced[id(output)] = (output, module)

    def before_bn(module, inputs) -> None:
        seen = produced.get(id(inputs[0]))
        conv = seen[1] if seen is not None and seen[0] is inputs[0] else None
        if conv is not None and pairs.get(module, conv) is conv:
            pairs[module] = conv
        else:
            pairs[module] = None  # fed by something else (at least once): left alone

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(after_conv))
        elif isinstance(m, nn.BatchNorm2d):
            hooks.append(m.register_forward_pre_hook(before_bn))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
        produced.clear()
    return [(conv, bn) for bn, conv in pairs.items() if conv is not None and not bn.training
            and bn.track_running_stats and bn.running_mean is not None and conv.padding_mode == "zeros"]


class InferenceCopy:
    """Replacements made to a model's modules and parameters for inference, undone by :meth:`restore`."""

    def __init__(self) -> None:
        self._params: list[tuple[nn.Module, str, Any]] = []
        self._modules: list[tuple[nn.Module, str, nn.Module]] = []

    def set_param(self, module: nn.Module, name: str, value: torch.Tensor | None) -> None:
        self._params.append((module, name, module._parameters.get(name)))
        module._parameters[name] = None if value is None else nn.Parameter(value, requires_grad=False)

    def set_module(self, parent: nn.Module, name: str, value: nn.Module) -> None:
        self._modules.append((parent, name, parent._modules[name]))
        parent._modules[name] = value

    def restore(self) -> None:
        for module, name, old in reversed(self._params):
            module._parameters[name] = old
        for parent, name, old in reversed(self._modules):
            parent._modules[name] = old
        self._params.clear()
        self._modules.clear()


@torch.no_grad()
def fold_batch_norms(model: nn.Module, run: Callable[[], torch.Tensor], changes: InferenceCopy,
                     tolerance: float = 1e-4) -> int:
    """Fold every eval-mode batch norm that directly follows a convolution into that convolution's weight and
    bias (the batch norm becomes an identity), as inference engines do. ``run`` computes a reference output
    before and a check after; if they differ by more than ``tolerance`` (relative to the largest output value,
    when that is over 1) the folding is undone.

    Returns:
        The number of batch norms folded (0 when none applied or the check failed).
    """
    if model.training:
        return 0
    before = run().float()
    pairs = _conv_bn_pairs(model, run)
    if not pairs:
        return 0
    parents = _parents(model)
    mark = (len(changes._params), len(changes._modules))
    for conv, bn in pairs:
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else \
            1.0 / torch.sqrt(bn.running_var + bn.eps)
        shift = (bn.bias if bn.affine else 0.0) - bn.running_mean * scale
        weight = conv.weight * scale.reshape(-1, *([1] * (conv.weight.dim() - 1)))
        bias = shift if conv.bias is None else conv.bias * scale + shift
        changes.set_param(conv, "weight", weight.detach().clone())
        changes.set_param(conv, "bias", bias.detach().clone())
        parent, name = parents[bn]
        changes.set_module(parent, name, nn.Identity())
    after = run().float()
    scale = max(1.0, before.abs().max().item())
    if after.shape != before.shape or (after - before).abs().max().item() > tolerance * scale:
        _undo_since(changes, mark)
        return 0
    return len(pairs)


def _undo_since(changes: InferenceCopy, mark: tuple[int, int]) -> None:
    params, modules = changes._params[mark[0]:], changes._modules[mark[1]:]
    for module, name, old in reversed(params):
        module._parameters[name] = old
    for parent, name, old in reversed(modules):
        parent._modules[name] = old
    del changes._params[mark[0]:], changes._modules[mark[1]:]


@contextlib.contextmanager
def prepared(model: nn.Module, *, channels_last: bool = True, fold: bool = True,
             example: Callable[[], torch.Tensor] | None = None) -> Iterator[bool]:
    """Run ``model`` prepared for fast inference, and leave it exactly as it was afterwards.

    Preparations: batch norms that follow convolutions folded into them (checked on ``example``, a function
    running the model on a small input, and skipped if the output moves); channels-last convolution weights.
    The original parameter objects are put back on exit, so an optimizer holding them is unaffected. A model in
    training mode is left alone.

    Yields:
        Whether inputs should be channels-last (:func:`to_channels_last`).
    """
    changes = InferenceCopy()
    nhwc = False
    try:
        if not model.training:
            if fold and example is not None and has_convolutions(model):
                fold_batch_norms(model, example, changes)
            if channels_last and has_convolutions(model):
                for m in model.modules():
                    if isinstance(m, nn.Conv2d) and m.weight.dim() == 4:
                        changes.set_param(m, "weight", m.weight.detach().contiguous(memory_format=torch.channels_last))
                nhwc = True
        yield nhwc
    finally:
        changes.restore()


def to_channels_last(images: torch.Tensor) -> torch.Tensor:
    """A ``[batch, 3, H, W]`` batch in NHWC layout (other shapes unchanged)."""
    return images.contiguous(memory_format=torch.channels_last) if images.dim() == 4 else images


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


_DONE = object()


def prefetch(items: Iterable[Any], depth: int = 2) -> Iterator[Any]:
    """Iterate ``items`` with up to ``depth`` of them prepared ahead in a background thread.

    An exception raised while preparing an item is raised here, at that item. ``depth`` 0 iterates in the
    calling thread. Stopping early (``break``, an error in the consumer) stops the thread at its next item.
    """
    if depth <= 0:
        yield from items
        return
    ahead: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                ahead.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put(item):
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            put(_Failure(exc))
            return
        put(_DONE)

    thread = threading.Thread(target=work, name="vlkit-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = ahead.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)
