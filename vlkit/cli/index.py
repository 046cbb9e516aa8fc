"""``vlkit index``: a LanceDB index of a dataset's embeddings, for ``vlkit search`` and ``vlkit serve``."""

from __future__ import annotations

import argparse

from vlkit.cli import add_precision

#: The default of --ann-threshold: ``vlkit.search.index.DEFAULT_ANN_THRESHOLD``, repeated here because importing
#: that module loads torch and lancedb, which ``vlkit --help`` must not wait for (a test keeps the two equal).
DEFAULT_ANN_THRESHOLD = 50_000


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``index`` subcommand to ``sub``."""
    p = sub.add_parser(
        "index",
        help="build a search index (LanceDB) of a dataset's images (or videos) and captions",
        description="Embed the images and captions of DATASET (or reuse the columns 'vlkit embed' wrote with "
        "the same model) and write a LanceDB index with ids, captions and thumbnails to --out. Tables "
        f"smaller than --ann-threshold ({DEFAULT_ANN_THRESHOLD}) are searched exactly; larger ones get an "
        "IVF_SQ index.",
    )
    p.add_argument("run", help="run directory, model directory or checkpoint")
    p.add_argument("--data", required=True, help="the Lance dataset")
    p.add_argument("--out", required=True,
                   help="index directory to write; an existing one is replaced (once the new one is complete) "
                   "only when it is an earlier vlkit index, never a folder of other files or an input")
    p.add_argument("--split", help="index only this split (default: every row)")
    p.add_argument("--ann-threshold", type=int, default=DEFAULT_ANN_THRESHOLD,
                   help=f"rows from which an approximate index is built (default {DEFAULT_ANN_THRESHOLD})")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--workers", type=int, default=0, help="decoding worker processes")
    p.add_argument("--frames", type=int, metavar="N",
                   help="a video dataset (one with a 'video' column) is indexed as videos: N frames sampled "
                   "uniformly per video, their embeddings mean-pooled (default: 8), thumbnails from the middle "
                   "frame; 0 indexes each video's middle frame as an image")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_precision(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``vlkit index``."""
    from vlkit.inference.embed import require_embeddings
    from vlkit.search.index import build_index
    from vlkit.inference.loading import load_for_inference
    from vlkit.utils.fs import check_output_dir

    check_output_dir(args.out, "index", inputs=[args.data, args.run], what="--out")  # before any work
    from vlkit.inference.video_embed import require_videos, resolve_frames

    if resolve_frames(args.data, args.frames):  # videos or images, and every row a video, before the model loads
        require_videos(args.data, args.split)
    loaded = load_for_inference(args.run)
    loaded.precision = args.precision  # recorded in the index: queries are embedded in the same precision
    require_embeddings(loaded.model, "vlkit index")
    info = build_index(loaded, args.data, args.out, args.split, batch_size=args.batch_size,
                       ann_threshold=args.ann_threshold, num_workers=args.workers, progress=not args.no_progress,
                       frames=args.frames)
    rows = f"{info.images} videos ({info.frames} frames each)" if info.frames else f"{info.images} images"
    print(f"indexed {rows} and {info.captions} captions ({info.dim}-d, model {info.model_tag}) "
          f"into {args.out}; search: " + ", ".join(f"{k} {v}" for k, v in info.search.items()))
    return 0
