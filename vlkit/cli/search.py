"""``vlkit search``: query an index from the command line (text->image, image->image, image->text)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path


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
    p.add_argument("--model", help="embed the query with this run instead of the index's own model")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``vlkit search``."""
    from vlkit.errors import VlkitError
    from vlkit.search.searcher import Searcher, check_image, check_k

    if (args.query is None) == (args.image is None):
        raise VlkitError("give either a text query or --image PATH (not both)")
    if args.captions and args.image is None:
        raise VlkitError("--captions searches captions by image: it needs --image PATH")
    check_k(args.k)
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
    searcher = Searcher(args.index, args.model)
    if data is not None:
        hits = searcher.image_to_text(data, args.k) if args.captions else searcher.search_image(data, args.k)
    else:
        hits = searcher.search_text(args.query, args.k)
    if not searcher.model_matches:
        print(f"vlkit: warning: {args.model} is not the model that built the index; scores compare embeddings "
              "of two models", file=__import__("sys").stderr)
    if args.json:
        print(json.dumps({"query": args.query, "image": args.image, "k": args.k,
                          "results": [asdict(h) for h in hits]}))
        return 0
    for rank, hit in enumerate(hits, 1):
        label = hit.text if args.captions else f"{hit.id}  {hit.caption}"
        print(f"{rank:3d}  {hit.score:.3f}  {label}")
    return 0
