"""``vlkit data``: look at datasets (info, show) and make synthetic ones (synth)."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``vlkit data`` and its actions to ``sub``."""
    p = sub.add_parser(
        "data", help="inspect datasets and generate synthetic data",
        description="Look at a Lance dataset made by 'vlkit ingest' (info: its counts, splits and classes; "
        "show: a contact sheet of its images) or make a synthetic shapes dataset to try things on (synth).",
    )
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION")
    dsub.required = True

    info = dsub.add_parser("info", help="rows, captions, splits, classes, questions, size, versions",
                           description="Print what a dataset holds: images, captions, questions, splits, "
                           "classes, extra columns, size on disk, versions and indices.")
    info.add_argument("dataset", help="a vlkit Lance dataset (made by vlkit ingest)")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=run_info)

    show = dsub.add_parser("show", help="a contact sheet of images with their first caption",
                           description="Draw the first N images of a dataset (or of one split), each with its "
                           "id and first caption, into one PNG.")
    show.add_argument("dataset", help="a vlkit Lance dataset (made by vlkit ingest)")
    show.add_argument("--out", "-o", required=True, help="PNG file to write")
    show.add_argument("--n", type=int, default=16, help="number of images (default 16)")
    show.add_argument("--split", help="only this split")
    show.set_defaults(func=run_show)

    synth = dsub.add_parser("synth", help="generate a synthetic shapes dataset and ingest it",
                            description="Draw N images of coloured shapes with captions, class labels and "
                            "questions, write them with synth.jsonl into OUT and ingest them into "
                            "OUT/synth.lance. The same arguments always give the same files.")
    synth.add_argument("--out", "-o", required=True, help="folder for images, synth.jsonl and synth.lance")
    synth.add_argument("--n", type=int, default=1000, help="number of images (default 1000)")
    synth.add_argument("--seed", type=int, default=0, help="seed for every random choice (default 0)")
    synth.add_argument("--image-size", type=int, default=64,
                       help="width and height of the square images in pixels, 32 to 1024 (default 64)")
    synth.add_argument("--format", default="png", choices=("png", "jpeg"),
                       help="image files: png (exact colours, default) or jpeg")
    synth.add_argument("--kind", default="shapes", choices=("shapes", "unanswerable", "text", "pairs",
                                                                "entailment", "dialog", "video"),
                       help="shapes (captions, labels, questions; default), unanswerable (shapes with questions "
                       "about absent objects answered 'unanswerable', with answerable and answer_type as VizWiz "
                       "has them), text (words written in the image, 'what word is written?', OCR tokens as "
                       "TextVQA has them), pairs (NLVR2: two images and a true or false sentence about them; --n "
                       "counts pairs), entailment (SNLI-VE lines: each image with an entailed, a neutral and a "
                       "contradicted hypothesis) or dialog (VisDial: a caption and three rounds about colour, shape "
                       "and count with 10 answer options each, written as a VisDial file with dense annotations) or video (mp4 "
                       "clips of a shape moving left, right, up or down, growing, shrinking, rotating or bouncing, "
                       "with the action as class and captions; needs PyAV)")
    synth.add_argument("--frames", type=int, default=16, help="video: frames per clip, 4 to 128 (default 16)")
    synth.add_argument("--layout", default="jsonl", choices=("jsonl", "folders"),
                       help="video: synth.jsonl with labels and captions (default) or class folders videos/<class>/")
    synth.add_argument("--sentences", metavar="KINDS",
                       help="pairs: the kinds of sentence, comma-separated, from color, shape, both, and, count, "
                       "background (default: all)")
    synth.set_defaults(func=run_synth)


def run_info(args: argparse.Namespace) -> int:
    from vlkit.data.store import dataset_info

    info = dataset_info(args.dataset)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    mib = info["bytes_on_disk"] / 2**20
    print(f"dataset     {info['path']}")
    print(f"images      {info['images']}")
    print(f"captions    {info['captions']}")
    print(f"questions   {info['questions']}")
    if info.get("pairs"):
        print(f"pairs       {info['pairs']} rows of two images (image, image2)")
    if info.get("videos"):
        print(f"videos      {info['videos']} rows with a video (video; image: its middle frame)")
    print("splits      " + ", ".join(f"{k}: {v}" for k, v in info["splits"].items()))
    if info["classes"]:
        shown = ", ".join(info["classes"][:12]) + (" ..." if len(info["classes"]) > 12 else "")
        print(f"classes     {len(info['classes'])} ({shown})")
    if info["extra_columns"]:
        print(f"extra       {', '.join(info['extra_columns'])}")
    print(f"fragments   {info['fragments']}")
    print(f"on disk     {mib:.1f} MiB")
    print(f"version     {info['version']} ({info['versions']} versions)")
    print(f"indices     {', '.join(info['indices']) or 'none'}")
    return 0


def run_show(args: argparse.Namespace) -> int:
    from vlkit.data.sheet import contact_sheet

    path = contact_sheet(args.dataset, args.out, n=args.n, split=args.split)
    print(f"wrote {path}")
    return 0


def run_synth(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vlkit.data.ingest import ingest
    from vlkit.data.synth_qa import generate_kind

    out = Path(args.out)
    if args.sentences is not None:  # NLVR2 pairs with chosen kinds of sentence (checked before any write)
        from vlkit.data.synth_pairs import generate_pairs
        from vlkit.errors import VlkitError

        if args.kind != "pairs":
            raise VlkitError("--sentences applies to --kind pairs only")
        kinds = [k.strip() for k in args.sentences.split(",") if k.strip()]
        jsonl = generate_pairs(out, args.n, seed=args.seed, image_size=args.image_size, image_format=args.format,
                               kinds=kinds)
    elif args.kind == "video":  # action clips (vlkit.data.synth_video)
        from vlkit.data.synth_video import generate_videos

        jsonl = generate_videos(out, args.n, seed=args.seed, image_size=args.image_size, frames=args.frames,
                                layout=args.layout)
    else:
        jsonl = generate_kind(out, args.n, args.kind, seed=args.seed, image_size=args.image_size,
                              image_format=args.format)
    report = ingest([jsonl], out / "synth.lance", progress=False)
    print(f"wrote {args.n} {'videos' if args.kind == 'video' else 'images'} and {jsonl}")
    print(report.summary())
    return 0
