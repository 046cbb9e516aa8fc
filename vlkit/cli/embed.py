"""``vlkit embed``: image and caption embeddings written into a dataset as new columns."""

from __future__ import annotations

import argparse


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
    p.add_argument("--workers", type=int, default=0, help="decoding worker processes")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``vlkit embed``."""
    from vlkit.inference.embed import compute_embeddings, require_embeddings, write_embeddings
    from vlkit.inference.loading import load_for_inference

    loaded = load_for_inference(args.run)
    require_embeddings(loaded.model, "vlkit embed")
    emb = compute_embeddings(loaded, args.data, None, batch_size=args.batch_size, num_workers=args.workers,
                             progress=not args.no_progress)
    version = write_embeddings(args.data, emb, loaded.tag, str(loaded.source))
    print(f"wrote {len(emb.ids)} image and {len(emb.captions)} caption embeddings ({emb.image.shape[1]}-d, "
          f"model {loaded.tag}) into {args.data} (version {version})")
    return 0
