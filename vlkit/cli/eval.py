"""``vlkit eval``: evaluate a run, model directory or checkpoint on a dataset split; optional HTML report."""

from __future__ import annotations

import argparse
import json
import sys

TASK_CHOICES = ("retrieval", "zeroshot", "linear-probe", "vqa")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``eval`` subcommand to ``sub``."""
    p = sub.add_parser(
        "eval",
        help="evaluate a trained model: retrieval, zero-shot classification or a linear probe",
        description="Embed one split of a dataset with a trained model and score it: image-text retrieval "
        "(recall@1/5/10 and ranks both ways), zero-shot classification with prompt templates (top-1/top-5, "
        "mean per-class recall, confusion matrix) or a linear probe (logistic regression on the frozen image "
        "embeddings of the training split). Metrics are named SPLIT/DATASET/METRIC.",
    )
    p.add_argument("model", metavar="RUN_OR_CHECKPOINT",
                   help="a run directory, a model directory (config.json + model.safetensors) or a checkpoint "
                   "(RUN/checkpoints/best)")
    p.add_argument("--task", choices=TASK_CHOICES, default="retrieval", help="what to measure (default: retrieval)")
    p.add_argument("--data", required=True, metavar="DATASET", help="a vlkit Lance dataset (made by vlkit ingest)")
    p.add_argument("--split", default="test", help="the split to evaluate (default: test)")
    p.add_argument("--train-split", default="train",
                   help="linear-probe: the split the classifier is fitted on (default: train)")
    p.add_argument("--templates", metavar="FILE",
                   help="zeroshot: prompt templates, one per line, each with {} for the class name "
                   "(default: a built-in set of 16)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: 64)")
    p.add_argument("--limit", type=int, metavar="N", help="evaluate only the first N images of the split")
    p.add_argument("--num-workers", type=int, default=0, help="image decoding worker processes (default: 0)")
    p.add_argument("--report", metavar="DIR", help="also write an HTML report (DIR/index.html with figures); an "
                   "existing DIR is replaced only when it is an earlier report")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=run)


def _print_table(summary: dict, result) -> None:
    print(f"{summary['task']}  {summary['dataset']}  split {summary['split']}")
    print(f"model {summary['model']}  (weights {summary['model_tag']})")
    if result.retrieval is not None:
        m = result.retrieval
        print(f"{summary['images']} images, {summary['captions']} captions\n")
        print(f"{'':14}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'mean rank':>12}{'median rank':>13}")
        for name, key in (("text->image", "t2i"), ("image->text", "i2t")):
            v = [getattr(m, f"{key}_{s}") for s in ("r1", "r5", "r10", "mean_rank", "median_rank")]
            print(f"{name:14}{v[0]:8.2f}{v[1]:8.2f}{v[2]:8.2f}{v[3]:12.2f}{v[4]:13.1f}")
        print(f"{'rsum':14}{m.rsum:8.2f}")
    elif summary["task"] == "vqa":
        prefix = next(k for k in summary["metrics"] if k.endswith("vqa_acc"))[: -len("vqa_acc")]
        print(f"{summary['images']} images, {summary['questions']} questions, {summary['answers']} answers\n")
        print(f"{'VQA accuracy':32}{summary['metrics'][prefix + 'vqa_acc']:7.2f} %")
        print(f"{'majority answer (' + summary['majority_answer'] + ')':32}"
              f"{summary['metrics'][prefix + 'vqa_majority_acc']:7.2f} %")
    else:
        m = result.classification
        extra = ""
        if summary["task"] == "linear-probe":
            extra = f", probe fitted on {summary['train_images']} '{summary['train_split']}' images, C={summary['C']:g}"
        elif summary["task"] == "zeroshot":
            extra = f", {len(summary['templates'])} templates"
        print(f"{summary['images']} images, {summary['classes']} classes{extra}")
        present = summary["classes_present"]
        shown = ", ".join(present[:12]) + (" ..." if len(present) > 12 else "")
        print(f"classes present: {shown} (scored against all {summary['classes_scored']} classes of the dataset)\n")
        k = min(5, m.num_classes)
        for name, value in (("top-1 accuracy", m.top1), (f"top-{k} accuracy", m.top5),
                            ("mean per-class recall", m.mean_per_class_recall),
                            (f"chance (1/{summary['classes']})", summary["chance"])):
            print(f"{name:24}{value:7.2f} %")
    print(f"\n({summary['seconds']:.1f} s)")


def run(args: argparse.Namespace) -> int:
    """Run ``vlkit eval``."""
    from vlkit.eval.evaluate import evaluate

    if args.report:  # before the evaluation: a report that could not be written is known at once
        from vlkit.utils.fs import check_output_dir

        check_output_dir(args.report, "report", inputs=[args.data, args.model], what="--report")
    templates = None
    if args.templates:
        if args.task != "zeroshot":
            from vlkit.errors import VlkitError

            raise VlkitError("--templates applies to --task zeroshot only")
        from vlkit.tasks.zeroshot import load_templates

        templates = load_templates(args.templates)
    result = evaluate(args.model, args.task, args.data, args.split, train_split=args.train_split,
                      templates=templates, batch_size=args.batch_size, limit=args.limit,
                      num_workers=args.num_workers, progress=not args.json and sys.stderr.isatty())
    summary = result.summary()
    if args.report:
        from vlkit.eval.report import write_report

        summary["report"] = str(write_report(result, args.report))
    if args.json:
        print(json.dumps(summary))
    else:
        _print_table(summary, result)
        if args.report:
            print(f"report: {summary['report']}")
    return 0
