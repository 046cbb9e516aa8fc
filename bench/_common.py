"""Helpers shared by the GPU benchmarks and ``run_all.py``: the machine line, result-line parsing, out-of-memory
detection and a GPU utilisation sampler.

Not a benchmark itself (``run_all.py`` skips files whose name starts with ``_``).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch


def machine_description(device: torch.device) -> str:
    """One line naming the device, the CPU cores and the software versions."""
    software = f"Python {platform.python_version()}, torch {torch.__version__}"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return f"{name}, CUDA {torch.version.cuda}, {os.cpu_count()} CPU cores, {software}"
    return f"{platform.machine()} CPU, {os.cpu_count()} cores, {software}"


ROOT = Path(__file__).resolve().parent.parent


def run_vlkit(*args, threads: int, timeout: float = 3600) -> str:
    """Run ``python -m vlkit ARGS`` in the checkout with ``threads`` torch threads; its stdout, or a RuntimeError
    ending with its stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    res = subprocess.run([sys.executable, "-m", "vlkit", *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"vlkit {' '.join(map(str, args[:2]))} failed: {res.stderr.strip()[-800:]}")
    return res.stdout


def last_json_line(text: str) -> dict[str, Any] | None:
    """The last line of ``text`` that starts with ``{`` and parses as a JSON object, or None."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    return None


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it wraps, as compiler errors do) is a device out-of-memory error."""
    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(torch.cuda, "OutOfMemoryError", None)) if t is not None)
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, oom_types) or "out of memory" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class GpuUtilSampler:
    """Samples the GPU's utilisation (percent of time a kernel ran) in a background thread.

    Uses NVML through ``pynvml`` when importable, else ``nvidia-smi``; on neither, :attr:`mean` stays None.

    Args:
        device: the CUDA device to watch.
        interval: seconds between samples.

    Example:
        >>> with GpuUtilSampler(torch.device("cuda")) as util:
        ...     work()
        >>> util.mean, util.source      # (87.5, "pynvml")
    """

    def __init__(self, device: torch.device, interval: float = 0.1):
        self.interval = interval
        self.samples: list[float] = []
        self.source: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._read = self._reader(device)

    def _reader(self, device: torch.device):
        uuid = _device_uuid(device)
        try:
            import pynvml

            pynvml.nvmlInit()
            try:
                handle = pynvml.nvmlDeviceGetHandleByUUID(uuid) if uuid else None
            except pynvml.NVMLError:
                handle = None
            if handle is None:
                handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            self.source = "pynvml"
            return lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except Exception:  # noqa: BLE001 - no NVML: try the command-line tool
            pass
        smi = shutil.which("nvidia-smi")
        if smi is None:
            return None
        target = uuid or str(device.index or 0)
        cmd = [smi, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", target]

        def read() -> float:
            return float(subprocess.run(cmd, capture_output=True, text=True, timeout=5).stdout.split()[0])

        try:
            read()
        except Exception:  # noqa: BLE001 - a broken nvidia-smi: no utilisation figure
            return None
        self.source = "nvidia-smi"
        return read

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(self._read())
            except Exception:  # noqa: BLE001 - a failed sample is skipped
                pass
            self._stop.wait(self.interval)

    def __enter__(self) -> "GpuUtilSampler":
        if self._read is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    @property
    def mean(self) -> float | None:
        """Mean utilisation in percent over the samples taken, or None."""
        return round(sum(self.samples) / len(self.samples), 1) if self.samples else None


def _device_uuid(device: torch.device) -> str | None:
    """The device's UUID as NVML and nvidia-smi spell it (``GPU-...``), which survives CUDA_VISIBLE_DEVICES."""
    try:
        uuid = str(torch.cuda.get_device_properties(device).uuid)
    except Exception:  # noqa: BLE001 - older torch: no uuid property
        return None
    return uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"


class Timer:
    """Wall-clock seconds of a block, after synchronising ``device`` at both ends."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self) -> "Timer":
        self._sync()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._sync()
        self.seconds = time.perf_counter() - self._start
