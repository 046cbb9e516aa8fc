"""A static HTML report of an evaluation: ``index.html`` with the metric tables, PNG figures beside it.

The directory is filled in a temporary directory beside it and renamed into place, so a reader never sees a
half-written report. An existing directory is replaced only when it is empty or an earlier report
(:func:`vlkit.utils.fs.atomic_directory`, kind ``report``). Open
``DIR/index.html`` in a browser; it needs nothing but the files next to it.

* retrieval: recall@K and ranks both ways, the image x caption similarity matrix of a sample of images and
  their first captions, and the top-5 images retrieved for a few captions with the correct one marked;
* zeroshot, linear-probe and classification: accuracy, per-class recall bars, the confusion matrix and the
  most frequent confusions (plus the prompt templates, the probe's regularisation choice, or the confusion
  counts as a table for the classification head);
* vqa: the accuracy beside the majority baseline;
* captioning: BLEU, METEOR, ROUGE-L, CIDEr-D, and the captions with the highest and lowest CIDEr-D beside their
  images and references (:mod:`vlkit.eval.caption_report`), plus the COCO results file.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
from pathlib import Path

import numpy as np
import torch

from vlkit.eval import figures
from vlkit.eval.evaluate import EvalResult, dataset_name
from vlkit.eval.thumbnails import split_thumbnails
from vlkit.utils.fs import REPORT_GENERATOR, atomic_directory

MATRIX_IMAGES = 8
EXAMPLE_QUERIES = 6
TOP_K = 5
GENERATOR = REPORT_GENERATOR

_CSS = """
body { font: 15px/1.5 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #222; margin: 0;
       background: #f6f7f9; }
main { max-width: 1180px; margin: 0 auto; padding: 28px 32px 60px; background: white; min-height: 100vh; }
h1 { font-size: 24px; margin: 0 0 4px; } h2 { font-size: 18px; margin: 34px 0 10px; border-bottom: 1px solid #e3e3e3;
     padding-bottom: 4px; }
.sub { color: #666; margin: 0 0 18px; } code { background: #f1f2f4; padding: 1px 5px; border-radius: 3px; }
table { border-collapse: collapse; margin: 8px 0 14px; font-variant-numeric: tabular-nums; }
th, td { padding: 5px 14px; border-bottom: 1px solid #e8e8e8; text-align: right; }
th:first-child, td:first-child { text-align: left; } th { background: #fafafa; font-weight: 600; }
dl { display: grid; grid-template-columns: max-content auto; gap: 2px 18px; margin: 0; }
dt { color: #666; } dd { margin: 0; word-break: break-all; }
figure { margin: 14px 0 26px; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 13px; margin-top: 4px; }
"""


def _fmt(value: float, digits: int = 1) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(name: str, caption: str) -> str:
    return (f'<figure><img src="{html.escape(name)}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _spread(n: int, k: int) -> list[int]:
    """``min(n, k)`` positions spread evenly over ``range(n)``, first and last included."""
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, min(n, k))})


# ---------------------------------------------------------------------------------------------- retrieval


def _retrieval_body(result: EvalResult, out: Path) -> str:
    m, emb = result.retrieval, result.embeddings
    noun = "video" if emb.frames else "image"  # videos: the mean of emb.frames frames' embeddings
    rows = [[f"text → {noun}", _fmt(m.t2i_r1), _fmt(m.t2i_r5), _fmt(m.t2i_r10), _fmt(m.t2i_mean_rank, 2),
             _fmt(m.t2i_median_rank, 1)],
            [f"{noun} → text", _fmt(m.i2t_r1), _fmt(m.i2t_r5), _fmt(m.i2t_r10), _fmt(m.i2t_mean_rank, 2),
             _fmt(m.i2t_median_rank, 1)]]
    parts = ["<h2>Retrieval</h2>",
             _table(["direction", "R@1 %", "R@5 %", "R@10 %", "mean rank", "median rank"], rows),
             f"<p>R-sum {_fmt(m.rsum)} · {len(emb.ids)} {noun}s · {len(emb.captions)} captions. Every caption "
             f"queries all {noun}s of the split; {'a video' if emb.frames else 'an image'} query is correct at "
             "rank r when any of its captions is among the first r texts.</p>"]

    owner = emb.caption_image.tolist()
    first_caption: dict[int, int] = {}
    for j, i in enumerate(owner):
        first_caption.setdefault(i, j)
    captioned = sorted(first_caption)
    images = [captioned[p] for p in _spread(len(captioned), MATRIX_IMAGES)]
    texts = [first_caption[i] for i in images]
    sims = (emb.text[texts] @ emb.image[images].T).numpy()  # [captions, images]
    thumbs = split_thumbnails(result.dataset, result.split, images)
    figures.similarity_matrix(sims, thumbs, [emb.captions[j] for j in texts], list(range(len(images))),
                              out / "similarity.png",
                              f"Image × caption similarity: {len(images)} {result.split} images, first caption each")
    parts.append(_figure("similarity.png", "Cosine similarity of sample images (columns) with each image's "
                                           "first caption (rows); a good model has the highest score on the diagonal."))

    queries = _spread(len(emb.captions), EXAMPLE_QUERIES)
    hits, ranks, answers, positions = [], [], [], set()
    for j in queries:
        scores = emb.image @ emb.text[j]  # [images]
        order = torch.sort(scores, descending=True, stable=True).indices[:TOP_K].tolist()
        correct = owner[j]
        ranks.append(1 + int((scores > scores[correct]).sum()))
        hits.append([(i, float(scores[i]), i == correct) for i in order])
        answers.append((correct, float(scores[correct])))
        positions.update(order + [correct])
    ordered = sorted(positions)
    thumb_of = dict(zip(ordered, split_thumbnails(result.dataset, result.split, ordered)))
    figures.retrieval_examples(
        [emb.captions[j] for j in queries],
        [[(thumb_of[i], s, ok) for i, s, ok in row] for row in hits], ranks,
        [(thumb_of[i], s) for i, s in answers], out / "retrieval_examples.png",
        f"Top {TOP_K} images for {len(queries)} {result.split} captions")
    parts.append(_figure("retrieval_examples.png", f"The {TOP_K} images each caption retrieves first, with "
                                                    "their cosine similarity; the correct image is framed."))
    from vlkit.eval.explain_report import explanations_figure

    parts.append(explanations_figure(result.model, emb.captions[queries[0]], [thumb_of[i] for i, _, _ in hits[0]],
                                     [s for _, s, _ in hits[0]], out))  # the first query's top images
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------- classification


def _vqa_body(result: EvalResult) -> str:
    d, m = result.details, result.metrics
    acc = next(v for k, v in m.items() if k.endswith("/vqa_acc"))
    rows = [["VQA accuracy (min(humans / 3, 1), official answer normalisation)", f"{_fmt(acc)} %"]]
    if "majority_answer" in d:
        majority = next(v for k, v in m.items() if k.endswith("/vqa_majority_acc"))
        rows.append([f"majority answer ({html.escape(d['majority_answer'])}, from {html.escape(d['majority_from'])})",
                     f"{_fmt(majority)} %"])
    rows += [["questions", str(d["questions"])], ["images", str(d["images"])],
             ["distinct human answers (answers generated)" if d.get("generative") else "answer vocabulary",
              str(d["answers"])]]
    return "<h2>Visual question answering</h2>" + _table(["metric", "value"], rows)


def _classification_body(result: EvalResult, out: Path) -> str:
    m, names = result.classification, result.class_names
    title = {"zeroshot": "Zero-shot classification", "classification": "Image-text classification",
             "nlvr2": "NLVR2: is the sentence true of the two images"}.get(
        result.task, "Linear probe")
    k = min(5, m.num_classes)
    d = result.details
    present = d["classes_present"]
    parts = [f"<h2>{title}</h2>",
             _table(["metric", "value"], [["top-1 accuracy", f"{_fmt(m.top1)} %"],
                                          [f"top-{k} accuracy", f"{_fmt(m.top5)} %"],
                                          ["mean per-class recall", f"{_fmt(m.mean_per_class_recall)} %"],
                                          ["chance (1 / classes present)", f"{_fmt(d['chance'])} %"],
                                          ["images", str(m.num_samples)],
                                          ["classes present", f"{len(present)} of the {m.num_classes} scored"]]),
             f"<p>Classes present in the evaluated images: {html.escape(', '.join(present))}.</p>"]
    if result.task == "linear-probe":
        d = result.details
        parts.append(f"<p>Logistic regression fitted on the {d['train_images']} image embeddings of split "
                     f"<code>{html.escape(d['train_split'])}</code>; C chosen on a held-out 20% of them, then "
                     f"refitted on all: <b>C = {d['C']:g}</b>.</p>")
        if d["holdout_accuracy"]:
            parts.append(_table(["C", "held-out accuracy %"],
                                [[c, _fmt(acc)] for c, acc in d["holdout_accuracy"].items()]))
    confusion = m.confusion.numpy()
    recall = m.per_class_recall.numpy()
    rows = np.flatnonzero(confusion.sum(axis=1))  # the bars and their chance line: the classes present
    figures.per_class_bars([names[i] for i in rows], recall[rows], confusion.sum(axis=1)[rows], m.top1,
                           out / "per_class.png",
                           f"{title}: recall per class ({result.split}, {m.num_samples} images)")
    parts.append(_figure("per_class.png", "Share of each class's images classified correctly, best first."))
    figures.confusion_figure(confusion, names, out / "confusion.png", f"{title}: confusion matrix")
    parts.append(_figure("confusion.png", "Rows: true class; columns: predicted class."))
    if result.task in ("classification", "nlvr2"):
        parts.append("<h2>Confusion matrix</h2>")
        parts.append(_table(["true \\ predicted", *names, "recall %"],
                            [[html.escape(names[i]), *(str(int(c)) for c in confusion[i]), _fmt(recall[i])]
                             for i in range(len(names))]))
    off = [(int(confusion[i, j]), i, j) for i in range(len(names)) for j in range(len(names))
           if i != j and confusion[i, j]]
    if off:
        top = sorted(off, key=lambda t: (-t[0], t[1], t[2]))[:10]
        parts.append("<h2>Most frequent confusions</h2>")
        parts.append(_table(["true class", "predicted as", "images", "% of the class"],
                            [[html.escape(names[i]), html.escape(names[j]), str(c),
                              _fmt(100 * c / confusion[i].sum())] for c, i, j in top]))
    if result.task == "zeroshot":
        templates = result.details["templates"]
        items = "".join(f"<li><code>{html.escape(t)}</code></li>" for t in templates)
        parts.append(f"<h2>Prompt templates ({len(templates)})</h2><ul>{items}</ul>")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------- page


def write_report(result: EvalResult, out_dir: str | Path) -> Path:
    """Write the HTML report of ``result`` into ``out_dir`` (replacing it), with its figures and ``metrics.json``.

    Returns:
        The path of ``index.html``.

    Raises:
        VlkitError: ``out_dir`` holds something other than an earlier report, is the dataset or cannot be
            written.
    """
    out_dir = Path(out_dir)
    summary = result.summary()
    with atomic_directory(out_dir, "report", inputs=[result.dataset], what="--report") as tmp:
        if result.task == "retrieval":
            body = _retrieval_body(result, tmp)
        elif result.task == "vqa":
            body = _vqa_body(result)
        elif result.task == "captioning":
            from vlkit.eval.caption_report import caption_body

            body = caption_body(result, tmp, _table)
        elif result.task == "visdial":
            from vlkit.eval.dialog import dialog_body

            body = dialog_body(result, _table)
        else:
            body = _classification_body(result, tmp)
        (tmp / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
        (tmp / "index.html").write_text(_page(result, body), encoding="utf-8")
    return out_dir / "index.html"


def _extra_css(result: EvalResult) -> str:
    if result.task != "captioning":
        return ""
    from vlkit.eval.caption_report import CSS

    return CSS


def _page(result: EvalResult, body: str) -> str:
    name = dataset_name(result.dataset)
    when = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    facts = [("model", result.model), ("weights", result.model_tag), ("dataset", str(result.dataset)),
             ("split", result.split), ("evaluated", f"{when} in {result.seconds:.1f} s")]
    info = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in facts)
    metrics = _table(["metric", "value"],
                     [[f"<code>{html.escape(k)}</code>", _fmt(v, 2)] for k, v in result.metrics.items()])
    return f"""<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
{GENERATOR}
<title>vlkit eval · {html.escape(result.task)} · {html.escape(name)}/{html.escape(result.split)}</title>
<style>{_CSS}{_extra_css(result)}</style></head>
<body><main>
<h1>{html.escape(result.task)} on {html.escape(name)} / {html.escape(result.split)}</h1>
<p class="sub">vlkit evaluation report</p>
<dl>{info}</dl>
{body}
<h2>All metrics</h2>
{metrics}
<p class="sub">The same values are in <a href="metrics.json">metrics.json</a>.</p>
</main></body></html>
"""
