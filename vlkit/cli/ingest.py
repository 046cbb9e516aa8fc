"""``vlkit ingest``: raw image-text data into a Lance dataset."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from vlkit.data.readers import FORMATS

DEFAULT_MAX_IMAGE_BYTES = 64 * 1024 * 1024  # vlkit.data.images.DEFAULT_MAX_IMAGE_BYTES, repeated: no Pillow import here

_UNITS = {"": 1, "B": 1, "K": 1024, "KB": 1024, "KIB": 1024, "M": 1024**2, "MB": 1024**2, "MIB": 1024**2,
          "G": 1024**3, "GB": 1024**3, "GIB": 1024**3}


def parse_size(text: str) -> int:
    """A size in bytes from ``123``, ``64K``, ``64M``, ``1G`` (binary units; ``MiB``/``MB`` read alike)."""
    raw = text.strip().upper()
    number = raw.rstrip("BKMGI")
    unit = raw[len(number):]
    try:
        value = float(number) * _UNITS[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use bytes, or a number with K, M or G)") from None
    if not math.isfinite(value):  # "inf", "nan", "1e400": int() of them would raise past argparse
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (a size must be a finite number of bytes)")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, not {text!r}")
    return int(value)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ingest",
        help="ingest image-text data (CSV, COCO JSON, JSONL, class folders, VQA, WebDataset tar shards, Parquet, "
        "Hugging Face datasets) into a Lance dataset",
        description="Read caption CSVs, COCO captions JSON, JSONL, class folders, VQA questions, WebDataset tar "
        "shards (img2dataset; brace patterns such as 'shard-{00000..00099}.tar'), Parquet files or Hugging Face "
        "datasets saved with save_to_disk into one Lance dataset. Several sources describing the same images are merged by image id. Ingesting into "
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
    p.add_argument("--allow-outside-root", action="store_true",
                   help="read images that lie outside the images root (default: only inside --images-root, "
                   "or the source's folder when none is given; symlinks resolved)")
    p.add_argument("--max-image-bytes", type=parse_size, default=DEFAULT_MAX_IMAGE_BYTES, metavar="SIZE",
                   help="skip image files larger than this (bytes, or with K/M/G; default: 64M)")
    p.add_argument("--image-column", help="parquet/hf: the image column (bytes, {bytes, path} struct or a path "
                   "relative to --images-root; default: 'image', else 'jpg')")
    p.add_argument("--text-column", help="parquet/hf: the caption column (default: 'caption', else 'text')")
    p.add_argument("--id-column", help="parquet/hf: the id column (default: 'key', else 'id', else the row number)")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local: threads of this process (default); ray: Ray Data workers read, check and write "
                   "fragments in parallel and this process commits them once (needs the 'ray' extra)")
    p.add_argument("--ray-workers", type=int, metavar="N",
                   help="--engine ray: tasks at once (default: the cluster's CPUs; --workers is then the "
                   "reading threads of each)")
    p.add_argument("--ray-address", metavar="ADDRESS",
                   help="--engine ray: the cluster to join (default: $RAY_ADDRESS, else a local Ray runtime)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vlkit.data.ingest import ingest, log_path, report_path

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
        allow_outside_root=args.allow_outside_root,
        max_image_bytes=args.max_image_bytes,
        image_column=args.image_column,
        text_column=args.text_column,
        id_column=args.id_column,
        engine=args.engine,
        ray_workers=args.ray_workers,
        ray_address=args.ray_address,
    )
    print(report.summary())
    print(f"report: {report_path(Path(args.out))} (every ingest: {log_path(Path(args.out))})")
    return 0
