"""The attention part of ``bench/video.py``: the training-step time of divided against joint space-time attention.

``attention(...)`` builds two TimeSformers of the same sizes that differ only in ``attention`` (``divided``:
temporal attention over the T frames at each patch position, then spatial attention over the N patches of each
frame; ``joint``: one attention over all T*N tokens), and times one step (forward, cross-entropy on random
labels, backward) on random clips of 8 and 16 frames. The contenders take turns in every round and the median
of ``repeats`` steps is reported, with the forward FLOPs counted by ``torch.utils.flop_counter.FlopCounterMode``
(one multiply-add = 2 FLOPs). Joint attention's cost grows with (T*N)^2, divided attention's with T*N*(T+N),
so the gap widens with the frame count.

Not a benchmark of its own (``run_all.py`` skips names starting with ``_``); run it through ``bench/video.py``
or directly: ``python bench/_video_attention.py [--frames 8 16] [--model timesformer-small] [--layers 4]
[--image-size 224] [--batch 1] [--repeats 3] [--threads N]``.
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
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import machine_description  # noqa: E402

from vlkit.models.registry import create_model  # noqa: E402
from vlkit.utils.flops import _extra_formulas  # noqa: E402

#: a table row: case, forward GFLOPs per clip (or a ratio), milliseconds per step (or a ratio), note
Row = tuple[str, float | None, float | None, str]


def _forward_flops(model: torch.nn.Module, video: torch.Tensor) -> float:
    counter = FlopCounterMode(display=False, custom_mapping=_extra_formulas())
    with torch.no_grad(), counter:
        model(video)
    return float(counter.get_total_flops())


def _step(model: torch.nn.Module, video: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(video), labels).backward()

    return run


def attention(frames: list[int] | None = None, model: str = "timesformer-small", layers: int | None = 4,
              image_size: int = 224, batch: int = 1, repeats: int = 3) -> tuple[list[Row], dict[str, Any]]:
    """Step time of divided against joint attention at each frame count (see the module docstring).

    Args:
        frames: frame counts (default 8 and 16).
        model: a registered TimeSformer size.
        layers: blocks (None: the named size's); the ratio between the variants does not depend on it.
        image_size: frame side in pixels.
        batch: clips per step.
        repeats: timed steps per contender (after one warm-up step each).

    Returns:
        The table rows and ``{"config": ..., "results": [{"frames", "tokens", "attention", "gflops", "ms"}],
        "joint_over_divided": {frames: {"gflops", "ms"}}}``.
    """
    frames = frames or [8, 16]
    results = []
    for t in frames:
        overrides: dict[str, Any] = {"frames": t, "image_size": image_size, "num_classes": 10}
        if layers is not None:
            overrides["layers"] = layers
        torch.manual_seed(0)
        models = {a: create_model(model, attention=a, **overrides).train() for a in ("divided", "joint")}
        video = torch.randn(batch, t, 3, image_size, image_size)  # [batch, frames, 3, H, W]
        labels = torch.randint(0, 10, (batch,))
        steps = {a: _step(m, video, labels) for a, m in models.items()}
        times: dict[str, list[float]] = {a: [] for a in steps}
        for fn in steps.values():
            fn()  # warm-up
        for _ in range(repeats):
            for a, fn in steps.items():
                start = time.perf_counter()
                fn()
                times[a].append((time.perf_counter() - start) * 1000)
        patches = (image_size // models["divided"].config.patch_size) ** 2
        for a, m in models.items():
            results.append({"frames": t, "tokens": 1 + t * patches, "attention": a,
                            "gflops": _forward_flops(m.eval(), video) / 1e9 / batch,
                            "ms": statistics.median(times[a])})
    rows: list[Row] = []
    ratios: dict[str, dict[str, float]] = {}
    for t in frames:
        by = {r["attention"]: r for r in results if r["frames"] == t}
        for a in ("divided", "joint"):
            r = by[a]
            rows.append((f"{t} frames ({r['tokens']} tokens), {a}", r["gflops"], r["ms"],
                         "forward GFLOPs per clip; ms per step (forward + backward)"))
        ratio = {key: by["joint"][key] / by["divided"][key] for key in ("gflops", "ms")}
        ratios[str(t)] = {k: round(v, 2) for k, v in ratio.items()}
        rows.append((f"{t} frames, joint / divided", ratio["gflops"], ratio["ms"], "ratios (FLOPs, time)"))
    config = {"model": model, "layers": layers, "image_size": image_size, "batch": batch, "repeats": repeats}
    return rows, {"config": config, "results": results, "joint_over_divided": ratios}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", nargs="+", type=int, default=[8, 16])
    parser.add_argument("--model", default="timesformer-small")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, result = attention(args.frames, args.model, args.layers, args.image_size, args.batch, args.repeats)
    out = {"bench": "video_attention", "machine": machine_description(torch.device("cpu")),
           "threads": torch.get_num_threads(), "attention": result}
    print(f"machine: {out['machine']}, {out['threads']} torch threads")
    print("| case | forward GFLOPs/clip (or ratio) | ms/step (or ratio) | note |")
    print("|---|---|---|---|")
    for case, gflops, ms, note in rows:
        shown_gflops = "-" if gflops is None else f"{gflops:.2f}"
        shown_ms = "-" if ms is None else f"{ms:.1f}"
        print(f"| {case} | {shown_gflops} | {shown_ms} | {note} |")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
