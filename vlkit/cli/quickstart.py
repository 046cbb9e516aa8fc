"""``vlkit quickstart``: the main job on its built-in sample data (the data part, for now)."""

from __future__ import annotations

import argparse
from pathlib import Path

SAMPLE = Path(__file__).resolve().parent.parent / "assets" / "coco-cc-by"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quickstart", help="ingest the bundled sample data (or --data) and show what it holds")
    p.add_argument("--data", nargs="+", help="your own sources, in any format 'vlkit ingest' reads")
    p.add_argument("--images-root", help="folder the image paths in --data are relative to")
    p.add_argument("--out", default="runs/quickstart", help="working folder (default runs/quickstart)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vlkit.data.ingest import ingest
    from vlkit.data.sheet import contact_sheet
    from vlkit.data.store import dataset_info

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sources = args.data or [SAMPLE / "captions.json", SAMPLE / "vqa_questions.json"]
    dataset = out / "data.lance"
    report = ingest(sources, dataset, images_root=args.images_root, progress=False)
    print(report.summary())
    info = dataset_info(dataset)
    print(
        f"dataset {dataset}: {info['images']} images, {info['captions']} captions, "
        f"{info['questions']} questions, splits {info['splits']}"
    )
    sheet = contact_sheet(dataset, out / "sheet.png", n=16)
    print(f"contact sheet: {sheet}")
    return 0
