"""How inference runs fast on a CPU (and a GPU): precision, memory format, and decoding beside the model.

Three measures, each with a switch so that the plain path stays one option away:

- **bf16 autocast** where the hardware computes in bf16 natively (x86 CPUs with AVX512-BF16 or AMX, CUDA GPUs
  with bf16): matrix products and convolutions run in bf16, reductions and normalisations in fp32 as autocast
  decides; outputs come back as fp32. ``precision="auto"`` picks it only on such hardware.
- **channels-last convolutions**: the model's 4-d weights and the input batch in NHWC layout, which oneDNN and
  cuDNN run faster. The model is converted for the duration of the call and restored afterwards, so a model that
  is also being trained is left as it was.
- **decoding beside the model**: a background thread pulls the next batches from the loader (JPEG decoding and
  resizing release the GIL) while the model runs on the current one.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from typing import Any, Iterable, Iterator, Literal

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


@contextlib.contextmanager
def channels_last(model: nn.Module, enabled: bool = True) -> Iterator[bool]:
    """Run ``model`` with its 4-d parameters in channels-last layout, restored to contiguous afterwards.

    Yields:
        Whether the conversion applies (enabled and the model has convolutions): inputs should then be
        converted with :func:`to_channels_last`.
    """
    if not (enabled and has_convolutions(model)):
        yield False
        return
    model.to(memory_format=torch.channels_last)
    try:
        yield True
    finally:
        model.to(memory_format=torch.contiguous_format)


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
