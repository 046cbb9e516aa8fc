"""Embedding images/s of ``vlkit embed --engine ray`` with 1 and 2 actors next to the local engine.

The quickstart model's shape (BriVL-style: EfficientNet-Lite0 + all-MiniLM-L6-v2 with untrained heads; speed
does not depend on the heads' weights) embeds the first ``--images`` Flickr8k-1k images and their captions.
A Ray pass is timed whole, as a user meets it: the actors start and load the model, embed their parts, and the
driver gathers the parts; the model's load time is reported apart. Every engine's embeddings are checked
equal to the local ones.

Run: ``python bench/ray_embed.py [--data ../shared/data/flickr8k-1k] [--images 256] [--ray-workers 1 2]``
Prints a markdown table and one JSON line.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def subset(data: Path, images: int, out: Path) -> Path:
    """A caption CSV of the first ``images`` images of ``data/captions.txt`` (all their captions)."""
    with open(data / "captions.txt", newline="") as fh:
        rows = list(csv.reader(fh))
    header, rows = rows[0], rows[1:]
    keep = list(dict.fromkeys(r[0] for r in rows))[:images]
    chosen = set(keep)
    with open(out, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(r for r in rows if r[0] in chosen)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "flickr8k-1k"))
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--ray-workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    data = Path(args.data).resolve()

    import ray

    from vlkit.data.ingest import ingest
    from vlkit.inference.embed import compute_embeddings
    from vlkit.inference.loading import load_for_inference
    from vlkit.inference.ray_embed import compute_embeddings_ray
    from vlkit.models.io import load_tokenizer, save_model
    from vlkit.models.registry import create_model

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        dataset = work / "flickr.lance"
        ingest([subset(data, args.images, work / "captions.csv")], dataset, images_root=data / "images",
               progress=False)
        torch.manual_seed(0)
        model = create_model("brivl-lite0-minilm").eval()
        save_model(model, work / "model", load_tokenizer("", model))
        del model

        start = time.perf_counter()
        loaded = load_for_inference(work / "model")
        load_s = time.perf_counter() - start
        compute_embeddings(loaded, dataset, None, batch_size=args.batch_size, limit=args.batch_size)  # warm-up
        start = time.perf_counter()
        local = compute_embeddings(loaded, dataset, None, batch_size=args.batch_size)
        results = {"local": len(local.ids) / (time.perf_counter() - start)}

        ray.init(address="local", num_cpus=max(args.ray_workers), include_dashboard=False, logging_level="ERROR",
                 log_to_driver=False)
        same = True
        try:
            for workers in args.ray_workers:
                start = time.perf_counter()
                remote = compute_embeddings_ray(work / "model", dataset, batch_size=args.batch_size, workers=workers)
                results[f"ray_{workers}"] = len(remote.ids) / (time.perf_counter() - start)
                same = same and remote.ids == local.ids and torch.allclose(remote.image, local.image, atol=1e-4)
        finally:
            ray.shutdown()

    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    print(f"quickstart-shaped model, {len(local.ids)} Flickr8k-1k images and {len(local.captions)} captions, "
          f"batch {args.batch_size}, precision {local.precision}; {machine}\n")
    print("| engine | images/s (with their captions) | vs local |")
    print("|---|---|---|")
    for name, value in results.items():
        label = f"local, {threads} torch threads" if name == "local" else f"ray, {name[4:]} actor(s) of 1 thread"
        print(f"| {label} | {value:.1f} | {value / results['local']:.2f}x |")
    print(f"\nmodel load (each actor pays it once): {load_s:.1f} s; same embeddings: {same}")
    print(json.dumps({"bench": "ray_embed", "machine": machine, "images": len(local.ids),
                      "captions": len(local.captions), "precision": local.precision,
                      **{f"{k}_images_per_s": round(v, 2) for k, v in results.items()},
                      "model_load_s": round(load_s, 2), "same_embeddings": bool(same)}))


if __name__ == "__main__":
    main()
