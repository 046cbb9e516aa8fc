"""Vision blocks: what window attention and masked pretraining save, in FLOPs and time per image.

Parts (each a function returning its table rows and its JSON figures; ``main`` runs the chosen ones and prints
one table and one JSON line):

- ``window_vs_global``: one transformer block with global attention (ViT, ``TransformerEncoderLayer``) against
  one shifted-window block (Swin, ``SwinBlock``, window 7) of the same width, heads and MLP, on the token map of
  16-pixel patches of a 224, 448 and 896 px image (14x14, 28x28, 56x56 tokens). Forward FLOPs are counted by
  ``torch.utils.flop_counter.FlopCounterMode`` (matrix products and attention; one multiply-add = 2 FLOPs),
  split into the attention core (scores and weighted values) and the rest (projections, MLP). Time: median
  of ``--repeats`` forward passes per image (batch 1, no gradients) after a warm-up; the two blocks take turns.
  Window attention's core grows linearly with the pixels (4x per doubling of the side), global attention's
  quadratically (16x per doubling).
- ``mae_vs_full``: a training step of an MAE (``--mae-model``, default ``mae-vit-small``: ViT-S/16 at 224 px,
  75% masking) against a full step of the same ViT on every patch, forward and backward: FLOPs (whole step and
  the encoder alone) and time per image.

Run: ``python bench/vision_blocks.py [--parts window_vs_global] [--sizes 224 448 896] [--repeats 5]
[--threads N]`` (prints a table and one JSON line).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import machine_description  # noqa: E402

from vlkit.modules.layers.transformer import TransformerEncoderLayer  # noqa: E402
from vlkit.modules.layers.window_attention import SwinBlock  # noqa: E402
from vlkit.utils.flops import _extra_formulas  # noqa: E402

#: a table row: part, case, GFLOPs per image, milliseconds per image, note
Row = tuple[str, str, float | None, float | None, str]


def count_flops(fn: Callable[[], Any]) -> tuple[float, float]:
    """Forward FLOPs of ``fn()``: (total, attention core). The core is the fused attention kernels or, where
    attention falls back to plain matrix products, the batched products (``bmm``) it is made of."""
    counter = FlopCounterMode(display=False, custom_mapping=_extra_formulas())
    with torch.no_grad(), counter:
        fn()
    per_op = counter.get_flop_counts().get("Global", {})
    core = sum(n for op, n in per_op.items() if "attention" in str(op) or "bmm" in str(op))
    return float(counter.get_total_flops()), float(core)


def time_ms(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median milliseconds of each callable, taking turns in every round (after one warm-up call each)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn()
        for _ in range(repeats):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(t) for name, t in times.items()}


# ------------------------------------------------------------------------------------ window vs global attention
def window_vs_global(sizes: list[int], repeats: int = 5, patch: int = 16, width: int = 384, heads: int = 6,
                     window: int = 7) -> tuple[list[Row], dict[str, Any]]:
    """Global against shifted-window attention at each image side in ``sizes`` (see the module docstring).

    Returns:
        The table rows and ``{"config": ..., "results": [{"size", "tokens", "impl", "gflops", "core_gflops",
        "ms"}], "growth": {...}}`` where ``growth`` gives each contender's FLOPs, core FLOPs and time at each size
        divided by those at the smallest size, beside the pixel ratio.
    """
    torch.manual_seed(0)
    blocks: dict[str, nn.Module] = {
        "global": TransformerEncoderLayer(width, heads, 4.0, "gelu").eval(),
        "window": SwinBlock(width, heads, window, shift=window // 2).eval(),
    }
    results = []
    for size in sizes:
        side = size // patch
        seq = torch.randn(1, side * side, width)  # [batch, tokens, width]
        grid = seq.view(1, side, side, width)  # [batch, H, W, width]
        fns = {"global": lambda: blocks["global"](seq), "window": lambda: blocks["window"](grid)}
        ms = time_ms(fns, repeats)
        for impl, fn in fns.items():
            total, core = count_flops(fn)
            results.append({"size": size, "tokens": side * side, "impl": impl, "gflops": total / 1e9,
                            "core_gflops": core / 1e9, "ms": ms[impl]})
    base = {r["impl"]: r for r in results if r["size"] == sizes[0]}
    growth: dict[str, Any] = {}
    rows: list[Row] = []
    for r in results:
        b = base[r["impl"]]
        g = {"pixels": (r["size"] / sizes[0]) ** 2, "gflops": r["gflops"] / b["gflops"],
             "core_gflops": r["core_gflops"] / b["core_gflops"], "ms": r["ms"] / b["ms"]}
        growth[f"{r['impl']}_{r['size']}"] = {k: round(v, 2) for k, v in g.items()}
        rows.append(("window_vs_global", f"{r['size']} px ({r['tokens']} tokens), {r['impl']} attention",
                     r["gflops"], r["ms"],
                     f"core {r['core_gflops']:.3f} GFLOPs; vs {sizes[0]} px: pixels x{g['pixels']:.0f}, "
                     f"FLOPs x{g['gflops']:.1f}, core x{g['core_gflops']:.1f}, time x{g['ms']:.1f}"))
    for size in sizes:
        by = {r["impl"]: r for r in results if r["size"] == size}
        rows.append(("window_vs_global", f"{size} px, global / window", by["global"]["gflops"] / by["window"]["gflops"],
                     by["global"]["ms"] / by["window"]["ms"], "ratios (FLOPs, time)"))
    config = {"patch": patch, "width": width, "heads": heads, "window": window, "repeats": repeats}
    return rows, {"config": config, "results": results, "growth": growth}


# ------------------------------------------------------------------------------------ MAE step vs full ViT step
def _step_ms(step: Callable[[], None], repeats: int) -> float:
    """Median milliseconds of a training step (forward and backward), after one warm-up step."""
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def mae_vs_full(model_name: str = "mae-vit-small", batch: int = 2, repeats: int = 3,
                mask_ratio: float = 0.75) -> tuple[list[Row], dict[str, Any]]:
    """An MAE training step (encoder on the visible quarter of the patches, light decoder over all of them,
    masked-pixel loss) against a full ViT step (the same encoder on every patch, a loss on its pooled feature),
    forward and backward, per image. FLOPs by ``vlkit.utils.flops.train_flops_per_sample``; time: median of
    ``repeats`` steps after a warm-up.

    Returns:
        The table rows and ``{"config", "gflops", "ms", "ratios"}`` (full / MAE, for the whole step and for the
        encoder alone).
    """
    from vlkit.models.registry import create_model
    from vlkit.utils.flops import train_flops_per_sample

    torch.manual_seed(0)
    model = create_model(model_name, mask_ratio=mask_ratio)
    size = model.config.image_size
    images = torch.randn(batch, 3, size, size)
    gen = torch.Generator().manual_seed(0)

    def mae_loss(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return m(x, generator=gen).loss

    def mae_encoder_loss(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return m.forward_encoder(x, m.random_mask(x.shape[0], x.device, gen)).mean()

    def full_loss(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return m.encoder(x).pow(2).mean()  # every patch through every block (mean pooling: no shortcut)

    gflops = {name: train_flops_per_sample(model, (images,), loss_fn=lambda m, b, f=fn: f(m, b[0])) / 1e9
              for name, fn in (("mae_step", mae_loss), ("mae_encoder", mae_encoder_loss), ("full_step", full_loss))}

    def step(fn: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            model.zero_grad(set_to_none=True)
            fn(model, images).backward()
        return run

    model.train()
    ms = {name: _step_ms(step(fn), repeats) / batch for name, fn in (("mae_step", mae_loss), ("full_step", full_loss))}
    ratios = {"step_gflops": gflops["full_step"] / gflops["mae_step"],
              "encoder_gflops": gflops["full_step"] / gflops["mae_encoder"],
              "step_ms": ms["full_step"] / ms["mae_step"]}
    c = model.config
    what = (f"{model_name} ({size} px, {(size // c.patch_size) ** 2} patches, width {c.width} x {c.layers}; "
            f"decoder {c.decoder_width} x {c.decoder_layers})")
    rows: list[Row] = [
        ("mae_vs_full", f"full ViT step, {what}", gflops["full_step"], ms["full_step"], "forward + backward"),
        ("mae_vs_full", f"MAE step, {mask_ratio:.0%} masked", gflops["mae_step"], ms["mae_step"],
         f"encoder part {gflops['mae_encoder']:.3f} GFLOPs"),
        ("mae_vs_full", "full / MAE", ratios["step_gflops"], ratios["step_ms"],
         f"ratios (FLOPs, time); encoder alone x{ratios['encoder_gflops']:.2f} fewer FLOPs"),
    ]
    config = {"model": model_name, "image_size": size, "batch": batch, "repeats": repeats, "mask_ratio": mask_ratio}
    return rows, {"config": config, "gflops": gflops, "ms": ms, "ratios": {k: round(v, 2) for k, v in ratios.items()}}


PARTS: dict[str, Callable[[argparse.Namespace], tuple[list[Row], dict[str, Any]]]] = {
    "window_vs_global": lambda a: window_vs_global(a.sizes, a.repeats),
    "mae_vs_full": lambda a: mae_vs_full(a.mae_model, repeats=a.repeats),
}


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=sorted(PARTS), default=list(PARTS))
    parser.add_argument("--sizes", nargs="+", type=int, default=[224, 448, 896])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--mae-model", default="mae-vit-small", help="the MAE of part mae_vs_full")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out: dict[str, Any] = {"bench": "vision_blocks", "machine": machine_description(torch.device("cpu")),
                           "threads": torch.get_num_threads()}
    rows: list[Row] = []
    for part in args.parts:
        part_rows, result = PARTS[part](args)
        rows.extend(part_rows)
        out[part] = result
    print(f"machine: {out['machine']}, {out['threads']} torch threads")
    print("| part | case | GFLOPs/image (or ratio) | ms/image (or ratio) | note |")
    print("|---|---|---|---|---|")
    for part, case, gflops, ms, note in rows:
        print(f"| {part} | {case} | {_fmt(gflops, 3)} | {_fmt(ms, 2)} | {note} |")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
