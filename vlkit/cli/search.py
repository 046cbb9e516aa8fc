"""``vlkit search``: query an index from the command line (text->image, image->image, image->text)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path


#: what --runtime onnx says about an index embedded in bf16
ONNX_PRECISION_NOTE = ("onnxruntime embeds queries in fp32, while --runtime torch embeds them in the index's "
                       "precision: scores can differ from its by bf16 rounding")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``search`` subcommand to ``sub``."""
    p = sub.add_parser(
        "search",
        help="search an index by text or by image",
        description="Find the images of INDEX that best match a text query, or (--image) the images most "
        "similar to an image; --captions searches the captions instead (image->text).",
    )
    p.add_argument("index", help="index directory made by 'vlkit index'")
    p.add_argument("query", nargs="?", help="the text query")
    p.add_argument("--image", help="search with this image instead of a text")
    p.add_argument("--captions", action="store_true", help="with --image: return captions (image->text)")
    p.add_argument("--k", type=int, default=5, help="results to return (1-100)")
    p.add_argument("--model", help="embed the query with this run instead of the index's own model (with "
                   "--runtime onnx: also a folder written by 'vlkit export --format onnx')")
    p.add_argument("--runtime", choices=("torch", "onnx"), default="torch",
                   help="what embeds the query: torch (default), or onnx: onnxruntime (pip install "
                   "'vlkit[onnx]'), from an ONNX export given as --model or the model exported at start; same "
                   "hits and scores (queries in fp32: an index embedded in bf16 gets a note). --rerank needs the PyTorch model and is refused with onnx")
    p.add_argument("--rerank", type=int, metavar="K",
                   help="text queries: re-score the K nearest images (K >= --k, at most 100) with the model's "
                   "image-text matching head (albef-*, blip-*, ...) and return the best --k by it; each score "
                   "becomes the ITM probability (the cosine is kept)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``vlkit search``."""
    from vlkit.errors import VlkitError
    from vlkit.search.searcher import MAX_K, Searcher, check_image, check_k

    if (args.query is None) == (args.image is None):
        raise VlkitError("give either a text query or --image PATH (not both)")
    if args.captions and args.image is None:
        raise VlkitError("--captions searches captions by image: it needs --image PATH")
    check_k(args.k)
    if args.rerank is not None:
        if args.runtime == "onnx":
            raise VlkitError("--rerank needs the PyTorch model (its image-text matching head): use --runtime torch")
        if args.image is not None:
            raise VlkitError("--rerank re-scores the images of a text query: it does not apply to --image")
        if not args.k <= args.rerank <= MAX_K:
            raise VlkitError(f"--rerank must be from --k ({args.k}) to {MAX_K}: it is the number of nearest images "
                             f"re-scored, of which the best --k are returned; got {args.rerank}")
    data = None
    if args.image is not None:
        path = Path(args.image)
        if not path.is_file():
            raise VlkitError(f"{path}: no such image file")
        data = path.read_bytes()
        try:
            check_image(data)  # size and pixel limit from the header, before the model is loaded
        except VlkitError as exc:
            raise VlkitError(f"{path}: {exc}") from None
    if args.runtime == "onnx":
        from vlkit.export.onnx_runtime import require_onnxruntime

        require_onnxruntime()  # one line before anything is loaded
    searcher = Searcher(args.index, args.model, runtime=args.runtime)
    precision = getattr(searcher.info, "precision", "fp32")
    if args.runtime == "onnx" and precision != "fp32":
        print(f"vlkit: note: the index was embedded in {precision}; {ONNX_PRECISION_NOTE}", file=sys.stderr)
    reranked = None
    if args.rerank is not None:
        from vlkit.inference.matching import require_matching

        require_matching(searcher.loaded.model, "--rerank")  # one line before the query is run
        reranked = searcher.rerank_text(args.query, args.k, args.rerank)
        hits = reranked.hits
        if reranked.note:
            print(f"vlkit: warning: {reranked.note}; re-scoring the index's stored thumbnails instead",
                  file=sys.stderr)
    elif data is not None:
        hits = searcher.image_to_text(data, args.k) if args.captions else searcher.search_image(data, args.k)
    else:
        hits = searcher.search_text(args.query, args.k)
    if not searcher.model_matches:
        print(f"vlkit: warning: {args.model} is not the model that built the index; scores compare embeddings "
              "of two models", file=sys.stderr)
    if args.json:
        out = {"query": args.query, "image": args.image, "k": args.k,
               "results": [{k: v for k, v in asdict(h).items() if reranked is not None or k not in ("cosine", "itm")}
                           for h in hits]}
        if reranked is not None:
            out.update(rerank=args.rerank, score="itm", images_from=reranked.images_from)
        print(json.dumps(out))
        return 0
    if reranked is not None:
        print(f"best {args.k} of the {args.rerank} nearest images by image-text matching ({reranked.images_from} "
              "images)\n  #    ITM  cosine")
    for rank, hit in enumerate(hits, 1):
        label = hit.text if args.captions else f"{hit.id}  {hit.caption}"
        cosine = f"  {hit.cosine:6.3f}" if reranked is not None else ""
        print(f"{rank:3d}  {hit.score:.3f}{cosine}  {label}")
    return 0
