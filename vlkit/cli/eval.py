"""``vlkit eval``: evaluate a run, model directory or checkpoint on a dataset split; optional HTML report and,
for captioning, the written captions as a COCO results file."""

from __future__ import annotations

import argparse
import json
import sys

from vlkit.cli import add_precision

TASK_CHOICES = ("retrieval", "zeroshot", "linear-probe", "classification", "nlvr2", "vqa", "captioning",
                "visdial", "video-classification")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``eval`` subcommand to ``sub``."""
    p = sub.add_parser(
        "eval",
        help="evaluate a trained model: retrieval, zero-shot, linear probe, classification, NLVR2, VQA, "
        "captioning or Visual Dialog",
        description="Run a trained model over one split of a dataset and score it: image-text retrieval "
        "(recall@1/5/10 and ranks both ways), zero-shot classification with prompt templates (top-1/top-5, "
        "mean per-class recall, confusion matrix), a linear probe (logistic regression on the frozen image "
        "embeddings of the training split), image-text classification such as SNLI-VE visual entailment (the "
        "classification head trained with the model: accuracy, per-class recall, confusion matrix), NLVR2 (is "
        "a sentence true of two images: the accuracy of the pair head trained with the model), VQA "
        "accuracy (an answer head, or answers a generative model "
        "writes), captioning (a caption written per image, scored against the references with BLEU-1..4, "
        "METEOR, ROUGE-L and CIDEr-D after PTB tokenisation) or Visual Dialog (visdial: the answer options of "
        "every dialog round ranked by the image-text matching head: MRR, R@1/5/10, mean rank, NDCG) or video "
        "classification (a video classifier such as timesformer-*: top-1/top-5, per-class recall, confusion "
        "matrix, the scores of --clips clips per video averaged). Metrics "
        "are named SPLIT/DATASET/METRIC.",
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
    p.add_argument("--rerank", type=int, metavar="K",
                   help="retrieval: re-rank each query's top K candidates (by contrastive similarity) with the "
                   "model's image-text matching head (albef-*, blip-*, ...); the metrics are after re-ranking, "
                   "those before are kept as ..._itc")
    p.add_argument("--rerank-score", choices=("itm", "itm+itc"), default="itm+itc",
                   help="with --rerank: order the top K by the ITM probability plus the contrastive similarity "
                   "mapped to [0, 1] (default, as BLIP), or by the ITM probability alone (itm, as ALBEF)")
    p.add_argument("--num-workers", type=int, default=0, help="image decoding worker processes (default: 0)")
    p.add_argument("--clips", type=int, default=1, metavar="K",
                   help="video-classification: clips per video, evenly spaced, their scores averaged (default: 1)")
    p.add_argument("--frames", type=int, metavar="N",
                   help="retrieval over a video dataset (one with a 'video' column, which is read as videos): "
                   "frames sampled uniformly per video, each embedded by the image tower and their mean the "
                   "video's embedding (default: 8); 0 reads each video's middle frame as an image")
    p.add_argument("--beams", type=int, metavar="N",
                   help="captioning and generated VQA answers: beam search width; 1 is greedy (default: what the "
                   "model was trained to use, saved in its generation.json, else 3)")
    p.add_argument("--max-new-tokens", type=int, metavar="N",
                   help="captioning: most tokens written per caption (generated VQA answers: at most 10; "
                   "default: the model's, else 30)")
    p.add_argument("--no-repeat-ngram", type=int, metavar="N",
                   help="captioning: never repeat an N-gram within a caption (0: allow; default: the model's)")
    p.add_argument("--prompt", metavar="TEXT",
                   help="captioning: a prefix every caption continues (e.g. 'a picture of'; not part of the "
                   "scored caption); vqa: the answer prompt, with {question} where the question goes "
                   "(default: the prompt the model was trained with)")
    p.add_argument("--spice", action="store_true",
                   help="captioning: also compute SPICE (needs Java and the Stanford CoreNLP jars; slow)")
    p.add_argument("--predictions", metavar="FILE.json",
                   help="captioning: write the captions as COCO results ([{\"image_id\": ..., \"caption\": ...}])")
    p.add_argument("--report", metavar="DIR", help="also write an HTML report (DIR/index.html with figures); an "
                   "existing DIR is replaced only when it is an earlier report")
    add_precision(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=run)


def _print_table(summary: dict, result) -> None:
    print(f"{summary['task']}  {summary['dataset']}  split {summary['split']}")
    print(f"model {summary['model']}  (weights {summary['model_tag']})")
    if result.retrieval is not None:
        m = result.retrieval
        noun = "video" if "videos" in summary else "image"
        if noun == "video":
            print(f"{summary['videos']} videos ({summary['frames']} frames each, mean-pooled), "
                  f"{summary['captions']} captions")
        else:
            print(f"{summary['images']} images, {summary['captions']} captions")
        if summary.get("ranking") == "itm":
            print(f"ranked by image-text matching over all {summary['pairs']} pairs (a fusion-only model)")
        elif "rerank" in summary:
            print(f"each query's top {summary['rerank']} re-ranked by image-text matching ({summary['rerank_pairs']} "
                  f"pairs scored in {summary['rerank_seconds']:.1f} s); 'itc' rows are before re-ranking")
        print(f"\n{'':18}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'mean rank':>12}{'median rank':>13}")
        before = {k.rsplit("/", 1)[-1][: -len("_itc")]: v for k, v in summary["metrics"].items() if k.endswith("_itc")}
        for name, key in ((f"text->{noun}", "t2i"), (f"{noun}->text", "i2t")):
            fields = [f"{key}_{s}" for s in ("r1", "r5", "r10", "mean_rank", "median_rank")]
            rows = [(name, [getattr(m, f) for f in fields])]
            if before:
                rows.append((f"{name} itc", [before[f] for f in fields]))
            for label, v in rows:
                print(f"{label:18}{v[0]:8.2f}{v[1]:8.2f}{v[2]:8.2f}{v[3]:12.2f}{v[4]:13.1f}")
        print(f"{'rsum':18}{m.rsum:8.2f}" + (f"   (itc {before['rsum']:.2f})" if before else ""))
    elif summary["task"] == "vqa":
        prefix = next(k for k in summary["metrics"] if k.endswith("vqa_acc"))[: -len("vqa_acc")]
        how = "generated answers" if summary["generative"] else f"{summary['answers']} answers in the head"
        print(f"{summary['images']} images, {summary['questions']} questions, {how}\n")
        print(f"{'VQA accuracy':32}{summary['metrics'][prefix + 'vqa_acc']:7.2f} %")
        if "majority_answer" in summary:
            print(f"{'majority answer (' + summary['majority_answer'] + ')':32}"
                  f"{summary['metrics'][prefix + 'vqa_majority_acc']:7.2f} %  (from {summary['majority_from']})")
        else:
            print("majority baseline left out: the evaluated questions have no human answers")
    elif summary["task"] == "captioning":
        _print_captioning(summary)
    elif summary["task"] == "visdial":
        from vlkit.eval.dialog import print_dialog_table

        print_dialog_table(summary)
    else:
        m = result.classification
        extra = ""
        if summary["task"] == "linear-probe":
            extra = f", probe fitted on {summary['train_images']} '{summary['train_split']}' images, C={summary['C']:g}"
        elif summary["task"] == "zeroshot":
            extra = f", {len(summary['templates'])} templates"
        elif summary["task"] == "classification":
            extra = f", each image paired with its {summary['text']}"
        elif summary["task"] == "video-classification":
            extra = f" (videos: {summary['clips_per_video']} clips of {summary['frames']} frames each)"
        elif summary["task"] == "nlvr2":
            extra = (f" (false, true): each image one of a pair, read with the pair's sentence; "
                     f"{summary['true_share']:.1f} % of the sentences true")
        noun = "videos" if summary["task"] == "video-classification" else "images"
        print(f"{summary['images']} {noun}, {summary['classes']} classes{extra}")
        present = summary["classes_present"]
        shown = ", ".join(present[:12]) + (" ..." if len(present) > 12 else "")
        print(f"classes present: {shown} (scored against all {summary['classes_scored']} classes of the dataset)\n")
        k = min(5, m.num_classes)
        for name, value in (("top-1 accuracy", m.top1), (f"top-{k} accuracy", m.top5),
                            ("mean per-class recall", m.mean_per_class_recall),
                            (f"chance (1/{summary['classes']})", summary["chance"])):
            print(f"{name:24}{value:7.2f} %")
        if "confusion" in summary:
            _print_confusion(summary["confusion"])
    print(f"\n({summary['seconds']:.1f} s)")


def _print_confusion(confusion: dict) -> None:
    names, matrix = confusion["classes"], confusion["matrix"]
    width = max(8, *(len(n) + 2 for n in names))
    print("\nconfusion (rows: true class, columns: predicted)")
    print(" " * width + "".join(f"{n:>{width}}" for n in names))
    for name, row in zip(names, matrix):
        print(f"{name:{width}}" + "".join(f"{v:>{width}d}" for v in row))


def _print_captioning(summary: dict) -> None:
    names = (("BLEU-1", "bleu1"), ("BLEU-2", "bleu2"), ("BLEU-3", "bleu3"), ("BLEU-4", "bleu4"),
             ("METEOR", "meteor"), ("ROUGE-L", "rouge_l"), ("CIDEr-D", "cider"), ("SPICE", "spice"))
    decoding = summary["decoding"]
    print(f"{summary['images']} images captioned ({summary['captioned_images']} with {summary['references']} "
          f"references scored), {decoding.get('num_beams', 1)} beams, at most "
          f"{decoding.get('max_new_tokens')} tokens\n")
    for label, key in names:
        value = next((v for k, v in summary["metrics"].items() if k.endswith("/" + key)), None)
        if value is not None:
            print(f"{label:10}{value:8.2f}")
    print(f"(times 100; {summary['tokenizer'].upper()} tokens)")
    if summary["note"]:
        print(f"note: {summary['note']}")


def _check_captioning_options(args: argparse.Namespace) -> dict | None:
    """The decoding options, checked before any work; None for a task that decodes nothing."""
    from vlkit.errors import VlkitError

    if args.task not in ("captioning", "vqa"):
        for name, value, default in (("--prompt", args.prompt, None), ("--predictions", args.predictions, None),
                                     ("--beams", args.beams, None), ("--max-new-tokens", args.max_new_tokens, None),
                                     ("--no-repeat-ngram", args.no_repeat_ngram, None), ("--spice", args.spice, False)):
            if value != default:
                raise VlkitError(f"{name} applies to --task captioning (and vqa with a generative model) only")
        return None
    if args.task == "vqa" and (args.predictions or args.spice):
        raise VlkitError(f"{'--predictions' if args.predictions else '--spice'} applies to --task captioning only")
    if args.beams is not None and args.beams < 1:
        raise VlkitError(f"--beams must be at least 1, got {args.beams}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise VlkitError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.no_repeat_ngram is not None and args.no_repeat_ngram < 0:
        raise VlkitError(f"--no-repeat-ngram must be at least 0, got {args.no_repeat_ngram}")
    if args.predictions:
        from vlkit.utils.fs import check_output_file

        check_output_file(args.predictions, inputs=[args.data, args.model], what="--predictions")
    # options not given are None: the model's own defaults (its generation.json) fill them
    return {"num_beams": args.beams, "max_new_tokens": args.max_new_tokens, "no_repeat_ngram_size": args.no_repeat_ngram}


def run(args: argparse.Namespace) -> int:
    """Run ``vlkit eval``."""
    from vlkit.eval.evaluate import evaluate

    settings = _check_captioning_options(args)
    if args.report:  # before the evaluation: a report that could not be written is known at once
        from vlkit.utils.fs import check_output_dir

        check_output_dir(args.report, "report", inputs=[args.data, args.model], what="--report")
    if args.rerank is not None and args.task != "retrieval":
        from vlkit.errors import VlkitError

        raise VlkitError("--rerank applies to --task retrieval only")
    templates = None
    if args.templates:
        if args.task != "zeroshot":
            from vlkit.errors import VlkitError

            raise VlkitError("--templates applies to --task zeroshot only")
        from vlkit.tasks.zeroshot import load_templates

        templates = load_templates(args.templates)
    result = evaluate(args.model, args.task, args.data, args.split, train_split=args.train_split,
                      templates=templates, batch_size=args.batch_size, limit=args.limit,
                      num_workers=args.num_workers, progress=not args.json and sys.stderr.isatty(),
                      settings=settings, prompt=args.prompt, spice=args.spice, rerank=args.rerank,
                      rerank_score=args.rerank_score, precision=args.precision, clips=args.clips,
                      frames=args.frames)
    summary = result.summary()
    if args.predictions:
        from vlkit.eval.caption_report import coco_results
        from vlkit.utils.fs import atomic_write

        atomic_write(args.predictions, json.dumps(coco_results(result), indent=1) + "\n")
        summary["predictions"] = str(args.predictions)
    if args.report and result.task == "retrieval" and result.embeddings is None:
        print("vlkit: warning: no report: its retrieval figures draw on embeddings, and a fusion-only model has "
              "none", file=sys.stderr)
        args.report = None
    if args.report:
        from vlkit.eval.report import write_report

        summary["report"] = str(write_report(result, args.report))
    if args.json:
        print(json.dumps(summary))
    else:
        _print_table(summary, result)
        if args.predictions:
            print(f"captions: {summary['predictions']}")
        if args.report:
            print(f"report: {summary['report']}")
    return 0
