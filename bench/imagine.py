"""Imagination speed at 224 px with the quickstart model, before and after the fast path, and its quality.

The quickstart model (BriVL-style: EfficientNet-Lite0 + MSPP heads, all-MiniLM-L6-v2 + heads; a trained ``--run``
or freshly built, the weights do not change the time) imagines an image at 224 px with
:func:`vlkit.explain.imagine.imagine`, configurations side by side in one process:

- ``before``: what ``vlkit imagine`` did before: 8 copies, fp32, contiguous (NCHW) layout, batch norms as layers;
- ``fast fp32, 8 copies``: channels-last convolutions and batch norms folded, still fp32;
- ``fast bf16, 8 copies``: the same under bf16 autocast (where the CPU computes bf16 natively);
- ``default``: what ``vlkit imagine`` does now: 4 copies, ``precision=auto``, channels-last, folded;
- ``default, work 160 px``: the default with the copies embedded at 160 px (``--work-size 160``).

Each configuration runs ``--steps`` timed steps after one warm-up step, ``--repeats`` times in alternating order;
the best run's median seconds per step counts (wall clock, and the process CPU time, which the other jobs of a
shared machine disturb less). The total is that times the default step count (128).

With ``--run`` and ``--quality``, the default imagines each of 3 prompts in full (128 steps) and the image,
embedded again without augmentation in fp32, ranks its own prompt among 50 captions of bundled COCO images that
do not show the prompt's object (rank 1 is best); the wall time of each whole imagination is printed too.

Run: ``python bench/imagine.py [--run runs/quickstart/run] [--quality] [--steps 3] [--repeats 2]``
(prints a table and one JSON line).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, machine_description  # noqa: E402

CONFIGS = {
    "before": dict(copies=8, precision="fp32", fast=False),
    "fast fp32, 8 copies": dict(copies=8, precision="fp32", fast=True),
    "fast bf16, 8 copies": dict(copies=8, precision="bf16", fast=True),
    "default": dict(copies=4, precision="auto", fast=True),
    "default, work 160 px": dict(copies=4, precision="auto", fast=True, work_size=160),
}
#: Prompts and a word that marks a caption of an image showing the prompt's object.
PROMPTS = {"a red stop sign by the road": "sign", "a pizza on a plate": "pizza", "a bus driving down the street": "bus"}
COCO = ROOT / "vlkit" / "assets" / "coco-cc-by" / "captions.json"


def load(run: str | None):
    """The quickstart model: a trained ``run``, or freshly built."""
    from vlkit.inference.loading import LoadedModel, load_for_inference
    from vlkit.models.io import load_tokenizer
    from vlkit.models.registry import create_model

    if run is not None:
        return load_for_inference(run)
    torch.manual_seed(0)
    model = create_model("brivl-lite0-minilm").eval()
    return LoadedModel(model, load_tokenizer("", model), Path("quickstart"), "bench")


def time_config(loaded, target: torch.Tensor, options: dict, steps: int) -> tuple[float, float]:
    """Median wall and CPU seconds per step over ``steps`` steps after one warm-up step."""
    from vlkit.explain.imagine import ImagineSettings, imagine, pixel_normalizer

    transform = loaded.model.preprocess.image_transform(train=False)
    marks: list[tuple[float, float]] = []

    def progress(step: int, similarity: float) -> None:
        marks.append((time.perf_counter(), time.process_time()))

    start = (time.perf_counter(), time.process_time())
    imagine(loaded.model, target, ImagineSettings(steps=steps + 1, size=224, **options), image_size=224,
            normalize=pixel_normalizer(transform.mean, transform.std), progress=progress)
    marks.insert(0, start)
    wall = [b[0] - a[0] for a, b in zip(marks[1:], marks[2:])]
    cpu = [b[1] - a[1] for a, b in zip(marks[1:], marks[2:])]
    return statistics.median(wall), statistics.median(cpu)


def other_captions(word: str, n: int = 50) -> list[str]:
    """The first caption of each of the first ``n`` bundled COCO images none of whose captions has ``word``."""
    data = json.loads(COCO.read_text())
    by_image: dict[int, list[str]] = defaultdict(list)
    for ann in data["annotations"]:
        by_image[ann["image_id"]].append(ann["caption"].strip())
    picked = [caps[0] for caps in by_image.values() if not any(word in c.lower() for c in caps)]
    if len(picked) < n:
        raise SystemExit(f"only {len(picked)} captions without {word!r}")
    return picked[:n]


def quality(loaded) -> list[dict]:
    """Each prompt imagined by the default settings at 224 px: its rank among 50 other captions and the time."""
    from vlkit.explain.imagine import ImagineSettings, embed_texts, imagine, pixel_normalizer

    model = loaded.model
    transform = model.preprocess.image_transform(train=False)
    normalize = pixel_normalizer(transform.mean, transform.std)
    rows = []
    for prompt, word in PROMPTS.items():
        texts = embed_texts(model, loaded.tokenizer, [prompt, *other_captions(word)])  # [51, dim]
        start = time.perf_counter()
        image = imagine(model, texts[0], ImagineSettings(size=224), image_size=transform.image_size,
                        normalize=normalize)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            embedded = F.normalize(model.encode_image(normalize(image[None])), dim=-1)[0]
        sims = texts @ embedded
        rows.append({"prompt": prompt, "rank": int((sims > sims[0]).sum()) + 1, "of": len(sims),
                     "cosine": round(float(sims[0]), 4), "seconds": round(seconds, 1)})
        print(f"{prompt:32s} rank {rows[-1]['rank']:2d} of {len(sims)}  cos {sims[0]:.3f}  {seconds:6.1f} s",
              flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="a trained quickstart run (default: the model freshly built)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration (default 3)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each configuration (default 2)")
    parser.add_argument("--quality", action="store_true", help="also imagine 3 prompts in full and rank them")
    parser.add_argument("--only", nargs="*", help="time only these configurations")
    args = parser.parse_args()
    loaded = load(args.run)
    model = loaded.model
    from vlkit.explain.imagine import ImagineSettings, embed_texts
    from vlkit.inference.speed import resolve_precision

    target = embed_texts(model, loaded.tokenizer, [next(iter(PROMPTS))])[0]
    names = args.only or list(CONFIGS)
    best: dict[str, tuple[float, float]] = {}
    for repeat in range(args.repeats):
        for name in (names if repeat % 2 == 0 else names[::-1]):
            wall, cpu = time_config(loaded, target, CONFIGS[name], args.steps)
            if name not in best or wall < best[name][0]:
                best[name] = (wall, cpu)
            print(f"  repeat {repeat + 1}: {name:22s} {wall:6.2f} s/step", file=sys.stderr, flush=True)
    steps = ImagineSettings().steps
    print(f"machine: {machine_description(torch.device('cpu'))}, {torch.get_num_threads()} torch threads; "
          f"auto precision here: {resolve_precision('auto')}")
    print(f"{'configuration':24s} {'s/step':>7s} {'cpu s/step':>10s} {f'{steps} steps':>10s} {'speed-up':>8s}")
    reference = best.get("before", next(iter(best.values())))[0]
    results = {}
    for name in names:
        wall, cpu = best[name]
        results[name] = {"s_per_step": round(wall, 3), "cpu_s_per_step": round(cpu, 3),
                         "total_s": round(wall * steps, 1), "speedup": round(reference / wall, 2)}
        print(f"{name:24s} {wall:7.2f} {cpu:10.2f} {wall * steps / 60:8.1f} m {reference / wall:7.2f}x")
    ranks = quality(loaded) if args.quality and args.run else None
    print(json.dumps({"bench": "imagine", "size": 224, "default_steps": steps, "configs": results,
                      "quality": ranks, "run": args.run}))


if __name__ == "__main__":
    main()
