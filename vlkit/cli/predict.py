"""``vlkit predict``: a trained model's predictions on a dataset split, one JSON line per sample (or the official
submission format), computed by the evaluation itself so that they agree with ``vlkit eval``'s metrics."""

from __future__ import annotations

import argparse
import json
import sys

from vlkit.cli import add_precision

TASK_CHOICES = ("retrieval", "zeroshot", "linear-probe", "classification", "nlvr2", "vqa", "captioning", "visdial")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``predict`` subcommand to ``sub``."""
    p = sub.add_parser(
        "predict",
        help="write a model's predictions on a split: one JSON line per sample, or the official format",
        description="Run a trained model over one split of a dataset, as vlkit eval does, and write what it "
        "predicts: retrieval (each image's top-k captions and each caption's top-k images with their scores), "
        "zeroshot, linear-probe and classification (the class and the top-k class probabilities), vqa (the "
        "answer and its score per question) or captioning (the written caption). --format official writes "
        "the submission format instead: VQA / EvalAI [{question_id, answer}] or COCO caption results "
        "[{image_id, caption}]. An existing --out is replaced only when vlkit wrote it, unless --force.",
    )
    p.add_argument("model", metavar="RUN_OR_CHECKPOINT",
                   help="a run directory, a model directory (config.json + model.safetensors) or a checkpoint")
    p.add_argument("--task", choices=TASK_CHOICES, required=True, help="what to predict")
    p.add_argument("--data", required=True, metavar="DATASET", help="a vlkit Lance dataset (made by vlkit ingest)")
    p.add_argument("--split", default="test", help="the split to predict (default: test)")
    p.add_argument("--out", "-o", required=True, metavar="FILE",
                   help="the predictions file (JSON lines; a JSON array with --format official)")
    p.add_argument("--format", dest="fmt", choices=("jsonl", "official"), default="jsonl",
                   help="jsonl (default): one line per sample; official: the task's submission format "
                   "(vqa, captioning)")
    p.add_argument("--top-k", type=int, default=5, metavar="K",
                   help="retrieval hits and classes kept per line (default: 5)")
    p.add_argument("--force", "-f", action="store_true",
                   help="replace --out even when it is a file vlkit did not write")
    p.add_argument("--train-split", default="train", help="linear-probe: the split the probe is fitted on")
    p.add_argument("--templates", metavar="FILE", help="zeroshot: prompt templates, one per line, with {}")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: 64)")
    p.add_argument("--limit", type=int, metavar="N", help="predict only the first N images of the split")
    p.add_argument("--num-workers", type=int, default=0, help="image decoding worker processes (default: 0)")
    p.add_argument("--beams", type=int, metavar="N", help="captioning and generated answers: beam search width")
    p.add_argument("--max-new-tokens", type=int, metavar="N", help="captioning: most tokens written per caption")
    p.add_argument("--prompt", metavar="TEXT",
                   help="captioning: a caption prefix; vqa: the answer prompt with {question}")
    add_precision(p)
    p.add_argument("--json", action="store_true", help="print one JSON object (the evaluation's summary and the "
                   "output file) instead of text")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``vlkit predict``."""
    from vlkit.errors import VlkitError
    from vlkit.eval.predict import check_output, check_request, predict, write_predictions

    check_request(args.task, args.fmt, args.top_k)
    check_output(args.out, force=args.force, inputs=[args.data, args.model])  # before any work
    settings = None
    if args.task in ("captioning", "vqa"):
        for name, value in (("--beams", args.beams), ("--max-new-tokens", args.max_new_tokens)):
            if value is not None and value < 1:
                raise VlkitError(f"{name} must be at least 1, got {value}")
        settings = {"num_beams": args.beams, "max_new_tokens": args.max_new_tokens}
    else:
        given = [n for n, v in (("--beams", args.beams), ("--max-new-tokens", args.max_new_tokens),
                                ("--prompt", args.prompt)) if v is not None]
        if given:
            raise VlkitError(f"{given[0]} applies to --task captioning and vqa only")
    templates = None
    if args.templates:
        if args.task != "zeroshot":
            raise VlkitError("--templates applies to --task zeroshot only")
        from vlkit.tasks.zeroshot import load_templates

        templates = load_templates(args.templates)
    made = predict(args.model, args.task, args.data, args.split, top_k=args.top_k, fmt=args.fmt,
                   train_split=args.train_split, templates=templates, batch_size=args.batch_size, limit=args.limit,
                   num_workers=args.num_workers, progress=not args.json and sys.stderr.isatty(), settings=settings,
                   prompt=args.prompt, precision=args.precision)
    path = write_predictions(args.out, made, force=args.force, inputs=[args.data, args.model])
    summary = made.result.summary()
    summary.update(predictions=str(path), lines=len(made.lines), format=args.fmt)
    if args.json:
        print(json.dumps(summary))
    else:
        what = "entries" if args.fmt == "official" else "lines"
        print(f"wrote {len(made.lines)} {what} to {path} ({args.task}, {summary['split']} of {summary['dataset']})")
        for name, value in summary["metrics"].items():
            print(f"  {name:40}{value:8.2f}")
    return 0
