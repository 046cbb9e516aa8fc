"""Search benchmark: embedding throughput, and query latency and recall@10 of each LanceDB search method.

1. Embedding throughput: the quickstart model (BriVL-style, EfficientNet-Lite0 + all-MiniLM-L6-v2) embeds the
   CIFAR-10 test images (``../shared/data/cifar10-test``, ingested as a class-folder dataset) through
   :func:`vlkit.inference.embed.compute_embeddings` (decode, resize, forward): images/s.
2. Search: those real image embeddings form the 10k table; larger tables (100k, optionally 1M) add vectors
   that are random convex mixtures of two real embeddings plus small noise, renormalised, so the set keeps the
   clustered structure of real embeddings (uniform random vectors are a misleading worst case). 200 queries
   are held-out mixtures. For each method: build time, single-query latency p50/p95, and recall@10 against the
   exact top 10 computed with numpy.

Methods: exact (flat scan), IVF_PQ as LanceDB builds it by default, IVF_PQ with refine_factor 10, IVF_SQ
(what ``vlkit index`` builds above its threshold, searched as :class:`~vlkit.search.searcher.Searcher` does:
nprobes 32, refine 10) and IVF_HNSW_SQ.

Run: ``python bench/search.py [--sizes 10000 100000] [--real 10000]`` (prints a table and one JSON line).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

ROOT = Path(__file__).resolve().parent.parent


def real_embeddings(data: Path, work: Path, limit: int) -> tuple[np.ndarray, float]:
    """Image embeddings of up to ``limit`` CIFAR-10 test images by the quickstart model, and images/s."""
    from vlkit.data.ingest import ingest
    from vlkit.models.io import load_tokenizer
    from vlkit.models.registry import create_model
    from vlkit.inference.embed import compute_embeddings
    from vlkit.inference.loading import LoadedModel

    dataset = work / "cifar.lance"
    ingest([data], dataset, progress=False, val_fraction=0.0, test_fraction=0.0)
    torch.manual_seed(0)
    model = create_model("brivl-lite0-minilm").eval()
    loaded = LoadedModel(model, load_tokenizer("", model), Path("quickstart"), "bench")
    compute_embeddings(loaded, dataset, None, batch_size=64, captions=False, limit=64)  # warm-up
    start = time.perf_counter()
    emb = compute_embeddings(loaded, dataset, None, batch_size=64, captions=False, limit=limit,
                             num_workers=1)
    seconds = time.perf_counter() - start
    return emb.image.numpy().astype(np.float32), len(emb.ids) / seconds


def expand(real: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` vectors: the real ones first, then normalised mixtures of random pairs plus noise."""
    if n <= len(real):
        return real[:n]
    extra = n - len(real)
    i, j = rng.integers(0, len(real), extra), rng.integers(0, len(real), extra)
    a = rng.uniform(0.5, 1.0, (extra, 1)).astype(np.float32)
    mixed = a * real[i] + (1 - a) * real[j] + rng.normal(0, 0.02, (extra, real.shape[1])).astype(np.float32)
    mixed /= np.linalg.norm(mixed, axis=1, keepdims=True)
    return np.concatenate([real, mixed])


def make_queries(real: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    q = expand(real, len(real) + n, rng)[len(real):]
    return q.astype(np.float32)


def run_method(db, name: str, vectors: np.ndarray, queries: np.ndarray, truth: np.ndarray) -> dict:
    from lancedb.index import IvfHnswSq, IvfPq, IvfSq

    dim = vectors.shape[1]
    table = db.create_table(name, pa.table({
        "id": pa.array(np.arange(len(vectors)), pa.int64()),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dim)}), mode="overwrite")
    parts = max(2, int(round(math.sqrt(len(vectors)))))
    start = time.perf_counter()
    method = name.rsplit("-", 1)[0]
    if method.startswith("ivf_pq"):
        table.create_index("vector", config=IvfPq(distance_type="cosine"))
    elif method == "ivf_sq":
        table.create_index("vector", config=IvfSq(distance_type="cosine", num_partitions=parts))
    elif method == "ivf_hnsw_sq":
        table.create_index("vector", config=IvfHnswSq(distance_type="cosine"))
    build = time.perf_counter() - start
    latencies, hits = [], 0
    for q, want in zip(queries, truth):
        query = table.search(q, vector_column_name="vector").distance_type("cosine").limit(10).select(["id"])
        if method == "ivf_pq_refine" or method == "ivf_sq":
            query = query.nprobes(32).refine_factor(10)
        t = time.perf_counter()
        got = query.to_arrow().column("id").to_numpy()
        latencies.append((time.perf_counter() - t) * 1000)
        hits += len(set(got.tolist()) & set(want.tolist()))
    lat = np.array(latencies[5:])  # the first queries load the index
    return {"method": method, "rows": len(vectors), "build_s": round(build, 2),
            "p50_ms": round(float(np.percentile(lat, 50)), 2), "p95_ms": round(float(np.percentile(lat, 95)), 2),
            "recall_at_10": round(hits / (10 * len(queries)), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10-test"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--real", type=int, default=2_000, help="real images to embed (the rest are mixtures)")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--methods", nargs="+", default=["exact", "ivf_pq", "ivf_pq_refine", "ivf_sq", "ivf_hnsw_sq"])
    args = parser.parse_args()
    import lancedb

    os.environ.setdefault("LANCE_LOG", "error")
    torch.set_num_threads(os.cpu_count() or 1)
    rng = np.random.default_rng(0)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        real, images_per_s = real_embeddings(Path(args.data), Path(tmp), args.real)
        queries = make_queries(real, args.queries, rng)
        db = lancedb.connect(str(Path(tmp) / "db"))
        for size in args.sizes:
            vectors = expand(real, size, rng)
            truth = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :10]
            for method in args.methods:
                results.append(run_method(db, f"{method}-{size}", vectors, queries, truth))
                print(results[-1], flush=True)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    print(f"\nembedding throughput (quickstart model, CIFAR-10 test images, batch 64): {images_per_s:.1f} images/s"
          f"; {len(real)} real {real.shape[1]}-d embeddings; {machine}\n")
    print("| vectors | method | build | p50 | p95 | recall@10 |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['rows']:,} | {r['method']} | {r['build_s']:.1f} s | {r['p50_ms']:.1f} ms | {r['p95_ms']:.1f} ms "
              f"| {r['recall_at_10']:.3f} |")
    print(json.dumps({"bench": "search", "machine": machine, "embed_images_per_s": round(images_per_s, 1),
                      "real_vectors": len(real), "dim": int(real.shape[1]), "results": results}))


if __name__ == "__main__":
    main()
