"""CLIP training throughput on one GPU in bf16, vlkit and optionally open_clip side by side.

Reports samples/s, step time, MFU and peak memory; with ``--reference open_clip``, open_clip's model of the same
architecture is timed with the identical loop in the same run.

The step: bf16 autocast, model + contrastive loss under ``torch.compile``, backward, fused AdamW, gradients set
to None. Inputs are synthetic and created on the device (the figure is the model's throughput, not the input
pipeline's: see ``gpu_input.py``). Nothing in the timed loop synchronises with the host: losses are kept as
device tensors every ``--log-every`` steps and read after the clock stops. Attention runs through
``scaled_dot_product_attention``; ``--sdpa flash`` (the default) forces the flash kernel and falls back to
torch's own choice when the model's shapes or masks rule it out; a profiled step then names the attention
kernels that actually ran. FLOPs per sample are counted once (``vlkit.utils.flops``) on the vlkit model and
used for both models' MFU (the architecture is the same).

Run (GPU): ``python bench/gpu_train.py [--model clip-vit-b-16] [--batch 256] [--reference open_clip]
[--find-max-batch]``
Smoke (CPU): ``python bench/gpu_train.py --device cpu --model clip-tiny --batch 8 --steps 3 --warmup 1
--no-compile``
Prints a markdown table and one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import vlkit  # noqa: E402
from _clip_step import (SDPA_BACKENDS, ContrastiveStep, build_open_clip, classify_attention_kernels,  # noqa: E402
                        make_optimizer, sdpa_context, synthetic_inputs)
from _common import Timer, is_out_of_memory, machine_description  # noqa: E402

try:
    from vlkit.utils import flops as flops_api
except ImportError:  # the FLOPs module is missing from this checkout: no MFU
    flops_api = None


def find_max_batch(fits: Callable[[int], bool], start: int, limit: int, resolution: int = 16) -> int:
    """The largest batch size for which ``fits`` holds: doubling from ``start``, then bisection.

    Args:
        fits: runs a batch size, True when it fits in memory.
        start: first size tried.
        limit: largest size tried while doubling.
        resolution: bisection stops when the bounds are this close.

    Returns:
        The largest size that fitted (0 when even the bisection's smallest did not).
    """
    lo, hi, size = 0, None, start
    while size <= limit:
        if fits(size):
            lo, size = size, size * 2
        else:
            hi = size
            break
    if hi is None:
        return lo
    while hi - lo > resolution:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def free_memory(device: torch.device) -> None:
    """Collect garbage and hand cached blocks back, so the next measurement starts clean."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Runner:
    """One model's step (compiled or not) with its optimizer, and the measurements made with it.

    Args:
        impl: ``vlkit`` or ``open_clip``.
        model: the model, on ``device``.
        cfg: the vlkit ``CLIPConfig`` of the architecture (input shapes).
        args: the command-line settings.
        device: where it runs.
    """

    def __init__(self, impl: str, model: nn.Module, cfg: Any, args: argparse.Namespace, device: torch.device):
        self.impl, self.cfg, self.args, self.device = impl, cfg, args, device
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model.train()
        self.eager = ContrastiveStep(model, impl)
        self.forward = torch.compile(self.eager, mode=args.compile_mode) if args.compile else self.eager
        self.opt = make_optimizer(model, device, args.fused)

    def inputs(self, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Synthetic images and token ids of ``batch`` samples on the device."""
        return synthetic_inputs(self.cfg, batch, self.device, seed=seed, channels_last=self.args.channels_last)

    def step(self, images: torch.Tensor, input_ids: torch.Tensor, forward: nn.Module | None = None) -> torch.Tensor:
        """One training step; returns the loss as a device tensor (no synchronisation)."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            loss = (forward or self.forward)(images, input_ids)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()

    def probe_sdpa(self, requested: str) -> tuple[str, str]:
        """Run an eager step on two samples under ``requested``; if that backend cannot run this model (a mask
        or shape it does not support), fall back to ``flash-first`` (flash wherever it can run, another kernel
        elsewhere) and then to torch's own choice.

        Returns:
            the backend to use and a note saying what happened.
        """
        images, ids = self.inputs(2, seed=1)
        failures = []
        for backend in dict.fromkeys([requested, "flash-first", "auto"]):
            try:
                with sdpa_context(backend), torch.autocast(self.device.type, dtype=torch.bfloat16):
                    self.eager(images, ids).backward()
            except (RuntimeError, TypeError) as exc:
                reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
                failures.append(f"{backend} could not run ({reason})")
                if backend == "auto":
                    raise
                continue
            finally:
                self.opt.zero_grad(set_to_none=True)
            return backend, "; ".join([*failures, f"ran with {backend}"])
        raise AssertionError("unreachable")

    def throughput(self, batch: int, backend: str) -> dict[str, Any]:
        """Warm up, time ``--steps`` steps, profile one more; samples/s, step time, peak memory, kernels."""
        args, device = self.args, self.device
        images, ids = self.inputs(batch)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        losses = []
        with sdpa_context(backend):
            for _ in range(args.warmup):
                self.step(images, ids)
            with Timer(device) as timer:
                for i in range(args.steps):
                    loss = self.step(images, ids)
                    if i % args.log_every == 0 or i == args.steps - 1:
                        losses.append(loss)
            kernels = self.attention_kernels(images, ids) if args.profile else []
        values = [float(x) for x in losses]  # read once the clock has stopped
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        return {"samples_per_s": round(batch * args.steps / timer.seconds, 2),
                "step_ms": round(1000 * timer.seconds / args.steps, 2),
                "peak_mem_gib": None if peak is None else round(peak, 2),
                "attention_kernels": kernels, "losses": [round(v, 4) for v in values],
                "loss_finite": all(math.isfinite(v) for v in values)}

    def attention_kernels(self, images: torch.Tensor, ids: torch.Tensor) -> list[str]:
        """The attention implementations one profiled step ran (see :func:`classify_attention_kernels`)."""
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            self.step(images, ids)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        return classify_attention_kernels(e.key for e in prof.key_averages())

    def max_batch(self, backend: str) -> int:
        """The largest batch a step fits in (each size compiled afresh, so memory is that of a static graph)."""
        args = self.args

        def attempt(batch: int) -> bool:
            if args.compile:
                torch._dynamo.reset()
            try:
                images, ids = self.inputs(batch)
                with sdpa_context(backend):
                    for _ in range(2):  # the second step also holds the optimizer state
                        self.step(images, ids)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                return True
            except Exception as exc:  # noqa: BLE001 - only out-of-memory errors mean "does not fit"
                if not is_out_of_memory(exc):
                    raise
                return False

        def fits(batch: int) -> bool:
            ok = attempt(batch)
            self.opt.zero_grad(set_to_none=True)
            free_memory(self.device)
            print(f"  {self.impl} batch {batch}: {'fits' if ok else 'out of memory'}", file=sys.stderr, flush=True)
            return ok

        found = find_max_batch(fits, args.batch, args.max_batch_limit, args.max_batch_resolution)
        if args.compile:
            torch._dynamo.reset()
        return found


def run(impl: str, model: nn.Module, cfg: Any, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Every measurement of one model; an out-of-memory error is reported in the result, not raised."""
    runner = Runner(impl, model, cfg, args, device)
    result: dict[str, Any] = {"impl": impl, "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2)}
    backend, note = runner.probe_sdpa(args.sdpa)
    result.update(sdpa=backend, sdpa_note=note)
    try:
        result.update(runner.throughput(args.batch, backend))
    except Exception as exc:  # noqa: BLE001
        if not is_out_of_memory(exc):
            raise
        result.update(samples_per_s=None, error=f"out of memory at batch {args.batch}")
    runner.opt.zero_grad(set_to_none=True)
    free_memory(device)
    if args.find_max_batch:
        result["max_batch"] = runner.max_batch(backend)
    del runner
    free_memory(device)
    return result


def add_mfu(result: dict[str, Any], flops_per_sample: float | None, peak: float | None) -> None:
    """Set ``result["mfu"]`` from its samples/s (None without a FLOP count, a peak or a throughput)."""
    sps = result.get("samples_per_s")
    value = flops_api.mfu(flops_per_sample, sps, peak) if flops_api and flops_per_sample and sps else None
    result["mfu"] = None if value is None else round(value, 4)


def count_flops(model: nn.Module, cfg: Any, batch: int, device: torch.device) -> tuple[float | None, str | None]:
    """Training FLOPs per sample of ``model`` on a few synthetic samples, or None and the reason."""
    if flops_api is None:
        return None, "vlkit.utils.flops is not available"
    images, ids = synthetic_inputs(cfg, min(batch, 4), device, seed=2)
    try:
        return flops_api.train_flops_per_sample(model, {"image": images, "input_ids": ids}), None
    except Exception as exc:  # noqa: BLE001 - MFU is then left out, the timing still stands
        return None, f"FLOP count failed: {type(exc).__name__}: {exc}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line settings (see ``--help``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="clip-vit-b-16", help="a vlkit CLIP name (clip-vit-b-16, clip-vit-b-32, "
                                                                 "clip-tiny, ...)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation happens here)")
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="run eagerly")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode (default: torch's default)")
    parser.add_argument("--no-fused", dest="fused", action="store_false", help="foreach AdamW instead of fused")
    parser.add_argument("--channels-last", action="store_true", help="channels-last images and patch convolution")
    parser.add_argument("--sdpa", choices=list(SDPA_BACKENDS), default="flash",
                        help="attention backend to force; when it cannot run the model, flash-first (flash where "
                             "possible) is used, then torch's own choice (auto)")
    parser.add_argument("--no-profile", dest="profile", action="store_false",
                        help="skip the profiled step that names the attention kernels")
    parser.add_argument("--log-every", type=int, default=10, help="keep the loss every N steps (read at the end)")
    parser.add_argument("--reference", choices=["open_clip"], help="also time open_clip's model of the same size")
    parser.add_argument("--find-max-batch", action="store_true", help="also find the largest batch that fits")
    parser.add_argument("--max-batch-limit", type=int, default=65536)
    parser.add_argument("--max-batch-resolution", type=int, default=16)
    parser.add_argument("--peak-flops", type=float, default=None, help="peak FLOP/s for MFU, instead of the table")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch < 1 or args.log_every < 1:
        parser.error("--steps, --batch and --log-every must be positive and --warmup non-negative")
    return args


def fmt(value: Any, spec: str = ".1f") -> str:
    """A table cell: ``-`` for None, lists joined, numbers formatted with ``spec``."""
    if value is None:
        return "-"
    if isinstance(value, list):
        return ", ".join(value) or "-"
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def print_table(report: dict[str, Any]) -> None:
    """The markdown table of vlkit against open_clip, and notes on SDPA, MFU and the reference."""
    ours, ref = report["vlkit"], report.get("reference") or {}
    print(f"{report['model']}, batch {report['batch']}, bf16, compile {report['compile']}, fused AdamW "
          f"{report['fused']}, channels-last {report['channels_last']}; {report['steps']} timed steps after "
          f"{report['warmup']}; {report['machine']}\n")
    have_ref = ref.get("available", False)
    print("| figure | vlkit | open_clip | vlkit / open_clip |")
    print("|---|---|---|---|")
    rows = [("samples/s", "samples_per_s", ".1f"), ("step time (ms)", "step_ms", ".1f"), ("MFU", "mfu", ".1%"),
            ("peak memory (GiB)", "peak_mem_gib", ".2f"), ("max batch", "max_batch", "d"),
            ("attention kernels", "attention_kernels", ""), ("parameters (M)", "params_m", ".2f")]
    for label, key, spec in rows:
        if key not in ours and key not in ref:
            continue
        a, b = ours.get(key), ref.get(key) if have_ref else None
        ratio = f"{a / b:.2f}x" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else "-"
        print(f"| {label} | {fmt(a, spec)} | {fmt(b, spec)} | {ratio} |")
    print(f"\nSDPA: flash_sdp_enabled={report['flash_sdp_enabled']}; vlkit: {ours.get('sdpa_note')}"
          + (f"; open_clip: {ref.get('sdpa_note')}" if have_ref else ""))
    if report.get("flops_note"):
        print(f"MFU: {report['flops_note']}")
    elif report["peak_flops"] is None:
        print("MFU: no peak FLOP/s known for this device (pass --peak-flops)")
    if report.get("reference") is not None:
        print(f"reference: {ref.get('note')}")
    for impl in (ours, ref):
        if impl.get("error"):
            print(f"{impl['impl']}: {impl['error']}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if device.index is not None:
            torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")
    torch.manual_seed(0)
    model = vlkit.create_model(args.model).to(device)
    cfg = model.config
    flops_per_sample, flops_note = count_flops(model, cfg, args.batch, device)
    peak = flops_api.peak_flops(device, override=args.peak_flops) if flops_api else None
    ours = run("vlkit", model, cfg, args, device)
    add_mfu(ours, flops_per_sample, peak)
    del model
    free_memory(device)

    reference = None
    if args.reference == "open_clip":
        torch._dynamo.reset()
        torch.manual_seed(0)
        other, note = build_open_clip(args.model, cfg)
        reference = {"impl": "open_clip", "available": other is not None, "note": note}
        if other is not None:
            reference.update(run("open_clip", other.to(device), cfg, args, device))
            add_mfu(reference, flops_per_sample, peak)
            del other
            free_memory(device)
            a, b = ours.get("samples_per_s"), reference.get("samples_per_s")
            reference["ratio_samples_per_s"] = round(a / b, 3) if a and b else None

    report = {"bench": "gpu_train", "machine": machine_description(device), "device": device.type,
              "model": args.model, "batch": args.batch, "steps": args.steps, "warmup": args.warmup,
              "precision": "bf16", "compile": args.compile, "compile_mode": args.compile_mode,
              "fused": args.fused and device.type == "cuda", "channels_last": args.channels_last,
              "flash_sdp_enabled": torch.backends.cuda.flash_sdp_enabled(),
              "flops_per_sample": flops_per_sample, "flops_note": flops_note, "peak_flops": peak,
              **{k: ours.get(k) for k in ("samples_per_s", "step_ms", "mfu", "peak_mem_gib", "attention_kernels",
                                          "max_batch", "params_m")},
              "vlkit": ours, "reference": reference}
    print_table(report)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
