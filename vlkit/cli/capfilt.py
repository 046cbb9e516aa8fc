"""``vlkit capfilt``: bootstrap a dataset's captions with a BLIP: caption every image, filter the original and
the synthetic captions with the image-text matching head, and write the kept ones."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``capfilt`` subcommand to ``sub``."""
    p = sub.add_parser(
        "capfilt",
        help="caption and filter a dataset's captions with a BLIP (CapFilt)",
        description="CapFilt: the model's captioner writes synthetic captions for every image of --split (nucleus "
        "sampling, top-p 0.9, unless --beams is given), its image-text matching head scores every original and "
        "synthetic caption, and the captions whose matching probability reaches --threshold are kept (an image "
        "whose captions all fall below keeps its best one). The kept captions replace the 'captions' column in a "
        "new version of DATA (the version before stays readable), or in a new dataset --out, with the columns "
        "caption_sources (original / synthetic), caption_scores and captions_dropped. Other splits are unchanged.",
    )
    p.add_argument("run", help="run directory, model directory or checkpoint of a BLIP (a captioner with an ITM head)")
    p.add_argument("--data", required=True, help="the Lance dataset to bootstrap")
    p.add_argument("--out", help="write a new dataset here instead of a new version of --data (must not exist)")
    p.add_argument("--split", default="train", help="the split to bootstrap (default train; 'all' for every row)")
    p.add_argument("--threshold", type=float, default=0.5, help="matching probability a caption needs (default 0.5)")
    p.add_argument("--num-synthetic", type=int, default=1, metavar="N", help="synthetic captions per image (default 1)")
    p.add_argument("--beams", type=int, metavar="N", help="write the synthetic captions by beam search instead of sampling")
    p.add_argument("--top-p", type=float, default=0.9, metavar="P", help="nucleus sampling threshold (default 0.9)")
    p.add_argument("--max-new-tokens", type=int, default=30, metavar="N", help="most tokens per caption (default 30)")
    p.add_argument("--prompt", metavar="TEXT", help="the captioner's prompt (default: the one it was trained with)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling (default 0)")
    p.add_argument("--limit", type=int, metavar="N", help="only the first N images of the split")
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="images per step (default 32)")
    p.add_argument("--dry-run", action="store_true", help="report what would be kept and dropped; write no dataset")
    p.add_argument("--decisions", metavar="FILE.jsonl",
                   help="also write every caption's decision, one JSON object per line (id, text, source, score, "
                   "kept): the scores to choose a --threshold from (must not exist)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def _check(args: argparse.Namespace) -> dict:
    from vlkit.errors import VlkitError

    for name, value in (("--num-synthetic", args.num_synthetic), ("--max-new-tokens", args.max_new_tokens),
                        ("--batch-size", args.batch_size), ("--beams", args.beams), ("--limit", args.limit)):
        if value is not None and value < 1:
            raise VlkitError(f"{name} must be at least 1, got {value}")
    if not 0.0 <= args.threshold <= 1.0:
        raise VlkitError(f"--threshold must be in [0, 1], got {args.threshold}")
    if not 0.0 < args.top_p <= 1.0:
        raise VlkitError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.beams is not None:
        if args.num_synthetic > args.beams:
            raise VlkitError(f"--num-synthetic {args.num_synthetic} needs at least as many --beams")
        return {"do_sample": False, "num_beams": args.beams, "max_new_tokens": args.max_new_tokens}
    return {"do_sample": True, "top_p": args.top_p, "max_new_tokens": args.max_new_tokens}


def _check_decisions(path: str | None):
    """The decisions file as a Path, refused (before any work) if it exists or its folder does not."""
    from pathlib import Path

    from vlkit.errors import VlkitError

    if path is None:
        return None
    path = Path(path)
    if path.exists() or path.is_symlink():
        raise VlkitError(f"{path}: already exists; --decisions writes a new file")
    if not path.parent.is_dir():
        raise VlkitError(f"{path.parent}: no such folder for --decisions")
    return path


def _write_decisions(path, result) -> None:
    """One JSON line per caption, written beside and linked into place (an existing file is never replaced)."""
    import os

    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temp, "w", encoding="utf-8") as fh:
        for image in result.images:
            for t in image.texts:
                fh.write(json.dumps({"id": image.id, "text": t.text, "source": t.source, "score": round(t.score, 6),
                                     "kept": t.kept}) + "\n")
    try:
        os.link(temp, path)  # unlike a rename, never replaces a file that appeared meanwhile
    except FileExistsError:
        from vlkit.errors import VlkitError

        raise VlkitError(f"{path}: appeared while CapFilt ran; the decisions are left at {temp}") from None
    os.unlink(temp)


def run(args: argparse.Namespace) -> int:
    """Run ``vlkit capfilt``."""
    from vlkit.data.capfilt_store import check_out, write_capfilt
    from vlkit.data.store import open_dataset, split_indices
    from vlkit.inference.capfilt import capfilt
    from vlkit.inference.interface import require_generative
    from vlkit.inference.matching import require_matching
    from vlkit.inference.loading import load_for_inference

    settings = _check(args)
    decisions = _check_decisions(args.decisions)
    split = None if args.split == "all" else args.split
    ds = open_dataset(args.data)
    split_indices(ds, split)  # the split exists
    check_out(args.data, args.out)
    loaded = load_for_inference(args.run)
    require_matching(require_generative(loaded.model), "CapFilt's filter")
    from tqdm import tqdm

    bar = None if args.json else tqdm(desc="capfilt", unit="image", dynamic_ncols=True, file=sys.stderr)
    try:
        result = capfilt(loaded, args.data, split, threshold=args.threshold, settings=settings, prompt=args.prompt,
                         num_synthetic=args.num_synthetic, seed=args.seed, batch_size=args.batch_size,
                         limit=args.limit, progress=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    summary = {"dataset": str(args.data), "split": args.split, **result.summary()}
    if decisions is not None:
        _write_decisions(decisions, result)
        summary["decisions"] = str(decisions)
    if not args.dry_run:
        outcome = write_capfilt(args.data, result.decisions(), result.meta(), args.out)
        summary.update(written=str(outcome.path), version_before=outcome.version_before, version=outcome.version,
                       new_dataset=outcome.copied)
    if args.json:
        print(json.dumps(summary))
        return 0
    c = result.counts
    print(f"{c['images']} images of split '{args.split}': {c['original']} original captions, {c['original_dropped']} "
          f"dropped; {c['synthetic']} synthetic captions written, {c['synthetic_added']} added; "
          f"{c['captions_before']} -> {c['captions_after']} captions")
    if c["rescued_images"]:
        print(f"{c['rescued_images']} images had no caption above the threshold and kept their best one")
    means = summary["mean_score"]
    print(f"mean matching probability: original {means['original']}, synthetic {means['synthetic']} "
          f"(threshold {args.threshold})")
    if args.dry_run:
        print("dry run: nothing written")
    elif summary["new_dataset"]:
        print(f"wrote {summary['written']} (a new dataset; {args.data} is unchanged)")
    else:
        print(f"wrote version {summary['version']} of {args.data} (version {summary['version_before']} keeps the "
              "captions before)")
    return 0
