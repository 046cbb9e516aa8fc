"""``vlkit embed``: image and caption embeddings written into a dataset as new columns."""

from __future__ import annotations

import argparse
from pathlib import Path

from vlkit.cli import add_precision


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``embed`` subcommand to ``sub``."""
    p = sub.add_parser(
        "embed",
        help="write image and caption embeddings into a dataset (new columns; images untouched)",
        description="Embed every image and caption of DATASET with a trained model and add the columns "
        "image_embedding and caption_embeddings (replacing earlier ones), tagged with the model's "
        "fingerprint. The image data files are not rewritten.",
    )
    p.add_argument("run", help="run directory, model directory or checkpoint")
    p.add_argument("--data", required=True, help="the Lance dataset")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--workers", type=int, default=0,
                   help="decoding worker processes (with --engine ray: of each actor)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local: this process (default); ray: Ray Data actors holding the model embed parts of "
                   "the rows, and this process writes the columns once (needs the 'ray' extra)")
    p.add_argument("--ray-workers", type=int, metavar="N",
                   help="--engine ray: actors (default: the cluster's GPUs / --gpus-per-worker, else its CPUs)")
    p.add_argument("--gpus-per-worker", type=float, default=0, metavar="G",
                   help="--engine ray: GPUs each actor holds (default 0: CPU actors)")
    p.add_argument("--ray-address", metavar="ADDRESS",
                   help="--engine ray: the cluster to join (default: $RAY_ADDRESS, else a local Ray runtime)")
    add_precision(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``vlkit embed``."""
    from vlkit.inference.embed import compute_embeddings, require_embeddings, write_embeddings
    from vlkit.inference.loading import load_for_inference

    loaded = load_for_inference(args.run)
    loaded.precision = args.precision
    require_embeddings(loaded.model, "vlkit embed")
    if args.engine == "ray":
        from vlkit.inference.ray_embed import compute_embeddings_ray

        # the actors load the run and read the dataset themselves: absolute paths, whatever their directory
        emb = compute_embeddings_ray(Path(args.run).resolve(), Path(args.data).resolve(), batch_size=args.batch_size,
                                     workers=args.ray_workers, gpus_per_worker=args.gpus_per_worker,
                                     num_workers=args.workers, precision=args.precision, address=args.ray_address)
    else:
        emb = compute_embeddings(loaded, args.data, None, batch_size=args.batch_size, num_workers=args.workers,
                                 progress=not args.no_progress)
    version = write_embeddings(args.data, emb, loaded.tag, str(loaded.source))
    print(f"wrote {len(emb.ids)} image and {len(emb.captions)} caption embeddings ({emb.image.shape[1]}-d, "
          f"model {loaded.tag}) into {args.data} (version {version})")
    return 0
