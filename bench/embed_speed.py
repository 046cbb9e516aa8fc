"""Embedding throughput of the quickstart model, end to end: read, decode, resize, model, heads.

The quickstart model (BriVL-style: EfficientNet-Lite0 + MSPP heads, all-MiniLM-L6-v2 + heads) embeds the images
of a dataset through :func:`vlkit.inference.embed.compute_embeddings`, side by side in one process:

- ``plain``: the path before the fast inference work: fp32, contiguous (NCHW) layout, batch norms as layers, no
  decoding ahead, one DataLoader decoding worker (how the README's earlier 19.4 images/s was measured);
- ``fp32, channels-last, BN folded`` then ``bf16, ...``: the measures one at a time, decoding in line;
- ``fast``: what ``vlkit embed``/``index``/``eval`` do by default: bf16 autocast where the CPU has native bf16,
  channels-last, batch norms folded, two batches decoded ahead in a thread, no worker process;
- ``onnxruntime``: the same model exported by ``vlkit export`` (checked against PyTorch to 1e-4), fed by the same
  loader and decoding thread: the reference the fast path is held to (the target is within 1.5x of it).

Each configuration runs ``--repeats`` times (after a warm-up) in an alternating order and the best run counts.
The fp32 and bf16 embeddings of every image are compared (cosine similarity), and with ``--captions``, the
recall@K both ways of the two, to show what bf16 costs in retrieval.

Run: ``python bench/embed_speed.py [--data ../shared/data/flickr8k-1k] [--images 512] [--captions]``
(prints a table and one JSON line).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, machine_description  # noqa: E402


def prepare(data: Path, work: Path, run: str | None):
    """The dataset (ingested into ``work``) and the quickstart model (a trained ``run``, or freshly built)."""
    from vlkit.data.ingest import ingest
    from vlkit.inference.loading import LoadedModel, load_for_inference
    from vlkit.models.io import load_tokenizer
    from vlkit.models.registry import create_model

    dataset = work / "data.lance"
    if (data / "captions.txt").is_file():  # Flickr8k: its caption file, images beside it
        ingest([data / "captions.txt"], dataset, images_root=data / "images", progress=False, val_fraction=0.0,
               test_fraction=0.0)
    else:  # class folders (CIFAR-10): images only
        ingest([data], dataset, progress=False, val_fraction=0.0, test_fraction=0.0)
    if run is not None:
        return dataset, load_for_inference(run)
    torch.manual_seed(0)
    model = create_model("brivl-lite0-minilm").eval()
    return dataset, LoadedModel(model, load_tokenizer("", model), Path("quickstart"), "bench")


def onnx_embeddings(loaded, dataset: Path, images: int, batch: int, folder: Path):
    """Image embeddings by onnxruntime, fed by the same loader and decoding thread as the fast path."""
    import onnxruntime as ort

    from vlkit.data.dataset import LanceImageTextDataset, make_loader
    from vlkit.export.onnx import IMAGE_FILE
    from vlkit.inference.speed import prefetch

    session = ort.InferenceSession(str(folder / IMAGE_FILE), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    ds = LanceImageTextDataset(dataset, None, loaded.model.preprocess.image_transform(train=False), None,
                               captions="none")
    out = []
    for b in prefetch(make_loader(ds, batch, list(range(min(images, len(ds))))), 2):
        out.append(session.run(None, {name: b["image"].numpy()})[0])
    return np.concatenate(out)


CONFIGS = {
    "plain": dict(precision="fp32", channels_last=False, fold_batch_norms=False, prefetch_batches=0, num_workers=1),
    "fp32, channels-last, BN folded": dict(precision="fp32", prefetch_batches=0),
    "bf16, channels-last, BN folded": dict(precision="bf16", prefetch_batches=0),
    "fast": dict(precision="auto"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "flickr8k-1k"))
    parser.add_argument("--run", help="a trained quickstart run (default: the untrained model; speed is the same)")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--captions", action="store_true",
                        help="also embed every caption (timed as its own row) and compare recall@K of fp32 and bf16")
    parser.add_argument("--no-onnx", action="store_true", help="leave out onnxruntime")
    args = parser.parse_args()
    from vlkit.inference.embed import compute_embeddings
    from vlkit.inference.speed import native_bf16

    os.environ.setdefault("LANCE_LOG", "error")
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        dataset, loaded = prepare(Path(args.data), work, args.run)
        runs = {name: dict(kw) for name, kw in CONFIGS.items()}
        folder = None
        if not args.no_onnx:
            from vlkit.export.onnx import export_onnx

            folder = work / "onnx"
            export_onnx(loaded, folder, card=False)
        best: dict[str, float] = {}
        embeddings: dict[str, torch.Tensor] = {}

        def timed(name: str) -> None:
            start = time.perf_counter()
            if name == "onnxruntime":
                emb = torch.from_numpy(onnx_embeddings(loaded, dataset, args.images, args.batch, folder))
            else:
                emb = compute_embeddings(loaded, dataset, None, batch_size=args.batch, captions=False,
                                         limit=args.images, **runs[name]).image
            rate = len(emb) / (time.perf_counter() - start)
            best[name] = max(best.get(name, 0.0), rate)
            embeddings[name] = emb

        names = list(runs) + ([] if folder is None else ["onnxruntime"])
        for name in names:  # warm-up: weights in cache, worker start-up paid once
            compute_embeddings(loaded, dataset, None, batch_size=args.batch, captions=False, limit=args.batch,
                               **runs.get(name, runs["fast"]))
        for repeat in range(args.repeats):
            for name in (names if repeat % 2 == 0 else names[::-1]):
                timed(name)
        cos = torch.nn.functional.cosine_similarity(embeddings["plain"], embeddings["fast"], dim=-1)
        result = {"bench": "embed_speed", "machine": machine_description(torch.device("cpu")),
                  "native_bf16": native_bf16("cpu"), "images": len(embeddings["plain"]), "batch": args.batch,
                  "images_per_s": {k: round(v, 1) for k, v in best.items()},
                  "speedup_fast_vs_plain": round(best["fast"] / best["plain"], 2),
                  "fast_vs_onnxruntime": round(best["fast"] / best["onnxruntime"], 2) if folder else None,
                  "cosine_fast_vs_fp32": {"min": round(float(cos.min()), 5), "mean": round(float(cos.mean()), 5)}}
        if args.captions:
            from vlkit.metrics.retrieval import retrieval_metrics

            recall, caption_rate = {}, {}
            for name in ("plain", "fast"):
                start = time.perf_counter()
                emb = compute_embeddings(loaded, dataset, None, batch_size=args.batch, limit=args.images,
                                         **runs[name])
                caption_rate[name] = round(len(emb.ids) / (time.perf_counter() - start), 1)
                m = retrieval_metrics(emb.image, emb.text, emb.caption_image)
                recall[name] = {k: round(getattr(m, k), 2) for k in ("t2i_r1", "t2i_r5", "i2t_r1", "i2t_r5", "rsum")}
            result["with_captions_images_per_s"] = caption_rate
            result["recall"] = recall
    print(f"Embedding throughput, quickstart model (brivl-lite0-minilm), {result['images']} images of "
          f"{Path(args.data).name}, batch {args.batch}, best of {args.repeats}; {result['machine']}; "
          f"native bf16: {result['native_bf16']}\n")
    print("| configuration | images/s | vs plain |")
    print("|---|---|---|")
    for name, rate in result["images_per_s"].items():
        print(f"| {name} | {rate:.1f} | {rate / result['images_per_s']['plain']:.2f}x |")
    print(f"\nfast vs plain: {result['speedup_fast_vs_plain']:.2f}x; fast vs onnxruntime: "
          f"{result['fast_vs_onnxruntime']}; cosine(fast, fp32) min {result['cosine_fast_vs_fp32']['min']}, "
          f"mean {result['cosine_fast_vs_fp32']['mean']}")
    if args.captions:
        print(f"with captions (images/s): {result['with_captions_images_per_s']}; recall: {result['recall']}")
    print()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
