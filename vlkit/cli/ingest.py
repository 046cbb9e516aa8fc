"""``vlkit ingest``: raw image-text data into a Lance dataset."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vlkit.data.readers import FORMATS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ingest",
        help="ingest image-text data (CSV, COCO JSON, JSONL, class folders, VQA) into a Lance dataset",
        description="Read caption CSVs, COCO captions JSON, JSONL, class folders or VQA questions into one "
        "Lance dataset. Several sources describing the same images are merged by image id. Ingesting into "
        "an existing dataset adds only images it does not hold yet.",
    )
    p.add_argument("sources", nargs="+", help="files or folders to read")
    p.add_argument("--out", "-o", required=True, help="the Lance dataset to create or append to (DIR.lance)")
    p.add_argument("--format", default="auto", choices=("auto", *FORMATS), help="reader (default: detect)")
    p.add_argument("--images-root", help="folder the image paths in the sources are relative to")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share for 'val' when the source has no split")
    p.add_argument("--test-fraction", type=float, default=0.1, help="share for 'test' when the source has no split")
    p.add_argument("--split", help="put every new image in this split")
    p.add_argument("--strict", action="store_true", help="write nothing if any input problem is found")
    p.add_argument("--fragment-rows", type=int, help="rows per Lance fragment (default: ~16 equal fragments)")
    p.add_argument("--workers", type=int, default=None, help="image-decoding threads (default: CPU count)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vlkit.data.ingest import ingest, report_path

    report = ingest(
        args.sources,
        args.out,
        fmt=args.format,
        images_root=args.images_root,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        split=args.split,
        strict=args.strict,
        fragment_rows=args.fragment_rows,
        workers=args.workers,
        progress=not args.quiet and sys.stderr.isatty(),
    )
    print(report.summary())
    print(f"report: {report_path(Path(args.out))}")
    return 0
