"""Imagination speed at 224 px with the quickstart model, before and after the fast path, and its quality.

The quickstart model (BriVL-style: EfficientNet-Lite0 + MSPP heads, all-MiniLM-L6-v2 + heads; a trained ``--run``
or freshly built, the weights do not change the time) imagines an image at 224 px with
:func:`vlkit.explain.imagine.imagine`, configurations side by side in one process:

- ``before``: what ``vlkit imagine`` did before: 8 copies, fp32, contiguous (NCHW) layout, batch norms as layers,
  all (2) cores' threads; ``before, 1 thread`` the same on one thread;
- ``fast fp32, 8 copies``: channels-last convolutions and batch norms folded, still fp32, one thread;
- ``fast bf16, 8 copies``: the same under bf16 autocast (where the CPU computes bf16 natively);
- ``default``: what ``vlkit imagine`` does now on a machine where another job keeps a core busy: 4 copies,
  ``precision=auto``, channels-last, folded, one thread (``idle_cores``); ``default, 2 threads`` beside it;
- ``default, work 160 px``: the default with the copies embedded at 160 px (``--work-size 160``).

Each configuration runs ``--steps`` timed steps after one warm-up step, ``--repeats`` times in alternating order.
Other jobs on a shared machine only ever add time, so the fastest step counts (its wall clock, and the process CPU
time of that step); the median step is printed beside it. The total is the fastest step times the
configuration's default step count (256 before, 128 now).

With ``--run`` and ``--quality``, the default imagines each of 3 prompts in full (128 steps) and the image,
embedded again without augmentation in fp32, ranks its own prompt among 50 captions of bundled COCO images that
do not show the prompt's object (rank 1 is best); the wall time of each whole imagination is printed too.

Run: ``python bench/imagine.py [--run runs/quickstart/run] [--quality] [--steps 3] [--repeats 2]``
(prints a table and one JSON line).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, machine_description  # noqa: E402

CONFIGS = {  # "steps": the configuration's default step count, for the total time
    "before": dict(copies=8, precision="fp32", fast=False, threads=2, steps=256),
    "before, 1 thread": dict(copies=8, precision="fp32", fast=False, threads=1, steps=256),
    "fast fp32, 8 copies": dict(copies=8, precision="fp32", fast=True, threads=1, steps=128),
    "fast bf16, 8 copies": dict(copies=8, precision="bf16", fast=True, threads=1, steps=128),
    "default": dict(copies=4, precision="auto", fast=True, threads=1, steps=128),
    "default, 2 threads": dict(copies=4, precision="auto", fast=True, threads=2, steps=128),
    "default, work 160 px": dict(copies=4, precision="auto", fast=True, work_size=160, threads=1, steps=128),
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


def time_config(loaded, target: torch.Tensor, options: dict, steps: int) -> list[tuple[float, float]]:
    """Wall and CPU seconds of each of ``steps`` steps after one warm-up step."""
    from vlkit.explain.imagine import ImagineSettings, imagine, pixel_normalizer

    transform = loaded.model.preprocess.image_transform(train=False)
    marks: list[tuple[float, float]] = []

    def progress(step: int, similarity: float) -> None:
        marks.append((time.perf_counter(), time.process_time()))

    settings = {k: v for k, v in options.items() if k not in ("steps", "threads")}
    threads = torch.get_num_threads()
    torch.set_num_threads(options["threads"])
    try:
        imagine(loaded.model, target, ImagineSettings(steps=steps + 1, size=224, **settings), image_size=224,
                normalize=pixel_normalizer(transform.mean, transform.std), progress=progress)
    finally:
        torch.set_num_threads(threads)
    return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(marks, marks[1:])]


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
    """Each prompt imagined by the default settings at 224 px (threads as ``vlkit imagine`` picks them): its rank
    among 50 other captions and the time."""
    from vlkit.explain.imagine import ImagineSettings, embed_texts, idle_cores, imagine, pixel_normalizer

    model = loaded.model
    transform = model.preprocess.image_transform(train=False)
    normalize = pixel_normalizer(transform.mean, transform.std)
    rows = []
    torch.set_num_threads(idle_cores())
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
        print(f"{prompt:32s} rank {rows[-1]['rank']:2d} of {len(sims)}  cos {sims[0]:.3f}  {seconds:6.1f} s "
              f"({torch.get_num_threads()} threads)", flush=True)
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
    from vlkit.explain.imagine import embed_texts
    from vlkit.inference.speed import resolve_precision

    target = embed_texts(model, loaded.tokenizer, [next(iter(PROMPTS))])[0]
    names = args.only or list(CONFIGS)
    times: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for repeat in range(args.repeats):
        for name in (names if repeat % 2 == 0 else names[::-1]):
            times[name] += time_config(loaded, target, CONFIGS[name], args.steps)
            print(f"  repeat {repeat + 1}: {name:22s} " + " ".join(f"{w:.2f}" for w, _ in times[name][-args.steps:])
                  + " s/step", file=sys.stderr, flush=True)
    print(f"machine: {machine_description(torch.device('cpu'))}; auto precision here: {resolve_precision('auto')}; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'configuration':24s} {'s/step':>7s} {'cpu s':>6s} {'median':>7s} {'steps':>5s} {'total':>8s} "
          f"{'speed-up':>8s} {'total':>6s}")
    fastest = {name: min(times[name]) for name in names}
    reference = fastest.get("before", fastest[names[0]])
    reference_total = reference[0] * CONFIGS.get("before", CONFIGS[names[0]])["steps"]
    results = {}
    for name in names:
        (wall, cpu), steps = fastest[name], CONFIGS[name]["steps"]
        median = statistics.median(w for w, _ in times[name])
        results[name] = {"s_per_step": round(wall, 3), "cpu_s_per_step": round(cpu, 3),
                         "median_s_per_step": round(median, 3), "steps": steps, "total_s": round(wall * steps, 1),
                         "step_speedup": round(reference[0] / wall, 2),
                         "total_speedup": round(reference_total / (wall * steps), 2)}
        print(f"{name:24s} {wall:7.2f} {cpu:6.2f} {median:7.2f} {steps:5d} {wall * steps / 60:6.1f} m "
              f"{reference[0] / wall:7.2f}x {reference_total / (wall * steps):5.1f}x")
    ranks = quality(loaded) if args.quality and args.run else None
    print(json.dumps({"bench": "imagine", "size": 224, "configs": results,
                      "quality": ranks, "run": args.run}))


if __name__ == "__main__":
    main()
