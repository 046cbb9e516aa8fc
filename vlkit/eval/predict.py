"""Predictions of a trained model on a dataset split, one JSON line per sample, from the evaluation's own run.

:func:`predict` runs :func:`vlkit.eval.evaluate.evaluate` (the same checks, model loading and forward passes,
so the predictions are exactly what the metrics were computed from) and turns its :class:`EvalResult` into
lines:

* retrieval: one line per image (``"query": "image"``) with its top-k captions, and one per caption
  (``"query": "caption"``) with its top-k images, each hit with its cosine similarity and ``correct`` (the
  pair belongs together in the dataset); equal scores put the correct pair first, as ``vlkit eval`` counts
  ties, so the share of queries with a correct hit among the first K is its recall@K;
* zeroshot, linear-probe, classification: ``class`` (the top class) and its ``label``, ``probabilities`` of the top-k
  classes (softmax of the classification head's logits; of the probe's decision scores; of 100 times the
  zero-shot cosine similarities, CLIP's temperature), ``true_class`` and ``true_label``; classification lines
  also carry each pair's ``text``;
* vqa: one line per question: ``answer``, ``score`` (the answer head's sigmoid probability, or the
  log-probability of a generated answer), ``question``, ``question_id`` where the dataset has one;
* captioning: ``caption`` and ``score`` (its log-probability) per image;
* nlvr2: one line per pair, as classification (``true``/``false`` with their probabilities, the sentence);
* visdial: one line per ranked round: the row's ``id``, ``round`` (from 1), ``ranks`` (the rank of each answer
  option, 1 the best, as VisDial's evaluation reads them), ``best_option`` and ``gt_index``.

``official`` gives the submission formats instead: VQA / EvalAI ``[{"question_id", "answer"}]`` and COCO
caption results ``[{"image_id", "caption"}]``.

The output file is written beside and renamed, with a hidden record beside it (``.NAME.vlkit.json``, holding
the file's SHA-256): an existing file is replaced only when that record shows vlkit wrote it as it is now, or
when ``force`` is given.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlkit.errors import DataError, VlkitError

TASKS = ("retrieval", "zeroshot", "linear-probe", "classification", "nlvr2", "vqa", "captioning", "visdial")
#: the tasks with an official submission format, and what it is
OFFICIAL = {"vqa": 'VQA / EvalAI answers [{"question_id", "answer"}]',
            "captioning": 'COCO caption results [{"image_id", "caption"}]'}
FORMATS = ("jsonl", "official")
#: CLIP's temperature: zero-shot cosine similarities times this are the logits of its class probabilities
ZEROSHOT_SCALE = 100.0


@dataclass
class Predictions:
    """What :func:`predict` made.

    Attributes:
        result: the evaluation the predictions come from (its metrics match them).
        lines: the JSON-ready objects: one per sample (``jsonl``), or the official file's entries.
        format: ``jsonl`` or ``official``.
    """

    result: Any
    lines: list[dict[str, Any]]
    format: str = "jsonl"

    def text(self) -> str:
        """The file's text: JSON lines, or one JSON array for the official format."""
        if self.format == "official":
            return json.dumps(self.lines) + "\n"
        return "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in self.lines)


def check_request(task: str, fmt: str, top_k: int) -> None:
    """Refuse an unknown task or format, an official format the task has none of, or ``top_k`` below 1."""
    if task not in TASKS:
        raise VlkitError(f"unknown task '{task}'; choose one of {', '.join(TASKS)}")
    if fmt not in FORMATS:
        raise VlkitError(f"unknown format '{fmt}'; choose jsonl or official")
    if fmt == "official" and task not in OFFICIAL:
        raise VlkitError(f"--format official: task {task} has no official submission format (there is one for "
                         + " and ".join(f"{t}: {v}" for t, v in OFFICIAL.items()) + ")")
    if top_k < 1:
        raise VlkitError(f"--top-k must be at least 1, got {top_k}")


def predict(model_path: str | Path, task: str, dataset: str | Path, split: str = "test", *, top_k: int = 5,
            fmt: str = "jsonl", **options: Any) -> Predictions:
    """Predict every sample of ``split``: evaluate, then one line per sample (see the module docstring).

    Args:
        model_path: a run directory, a model directory or a training checkpoint.
        task: one of :data:`TASKS`.
        dataset: a vlkit Lance dataset.
        split: the split to predict.
        top_k: retrieval hits and classes kept per line.
        fmt: ``jsonl``, or ``official`` (vqa and captioning).
        **options: further :func:`vlkit.eval.evaluate.evaluate` options (batch_size, limit, templates ...).

    Raises:
        VlkitError, DataError: as :func:`vlkit.eval.evaluate.evaluate`; ``official`` VQA answers need question
            ids (a ``question_id`` column, from VQA files that have them), checked before the model loads.
    """
    from vlkit.data.store import OpenedDataset
    from vlkit.eval.evaluate import evaluate

    check_request(task, fmt, top_k)
    data = OpenedDataset.open(dataset)
    if task == "vqa" and fmt == "official" and "question_id" not in data.ds.schema.names:
        raise DataError(f"{data}: no question ids (column question_id); the official VQA format answers by "
                        "question_id: ingest VQA question files that have them, or use --format jsonl")
    if task == "retrieval" and options.get("rerank") is not None:
        raise VlkitError("predict ranks by the contrastive embeddings; --rerank is for vlkit eval")
    result = evaluate(model_path, task, data, split, **options)
    if task == "retrieval":
        lines = retrieval_lines(result, top_k)
    elif task == "vqa":
        lines = vqa_lines(result, data)
        if fmt == "official":
            missing = next((line for line in lines if line.get("question_id") is None), None)
            if missing is not None:
                raise DataError(f"{data}: row {missing['id']!r}: question {missing['question_index']} has no "
                                "question_id, which the official VQA format answers by; use --format jsonl")
            lines = [{"question_id": line["question_id"], "answer": line["answer"]} for line in lines]
    elif task == "captioning":
        if fmt == "official":
            from vlkit.eval.caption_report import coco_results

            lines = coco_results(result)
        else:
            lines = [{"id": r["id"], "caption": r["caption"], "score": r["score"]} for r in result.captions or []]
    elif task == "visdial":
        lines = [{**sample, "best_option": sample["ranks"].index(1)} for sample in result.samples]
    else:
        lines = class_lines(result, top_k)
    return Predictions(result, lines, fmt)


def ranked(scores: torch.Tensor, correct: torch.Tensor, k: int) -> torch.Tensor:
    """``[queries, k]`` candidate positions by descending score; equal scores put the query's own pairs
    first, as the recall of ``vlkit eval`` counts ties (:mod:`vlkit.metrics.retrieval`), then keep order.

    Args:
        scores: ``[queries, candidates]``.
        correct: ``[queries, candidates]`` bool, the pairs the dataset holds.
        k: candidates kept per query.
    """
    own_first = torch.sort(correct.to(torch.int8), dim=1, descending=True, stable=True).indices
    by_score = torch.sort(scores.gather(1, own_first), dim=1, descending=True, stable=True).indices[:, :k]
    return own_first.gather(1, by_score)


def retrieval_lines(result, top_k: int, chunk: int = 256) -> list[dict[str, Any]]:
    """Each image's top-k captions, then each caption's top-k images, by cosine similarity."""
    emb = result.embeddings
    if emb is None:
        raise VlkitError("predict --task retrieval ranks by image and text embeddings, which this model lacks "
                         "(a fusion-only model scores pairs: use vlkit eval --task retrieval)")
    image, text, owner = emb.image.float(), emb.text.float(), emb.caption_image.long()
    lines = []
    k = min(top_k, len(text))
    for start in range(0, len(image), chunk):
        rows = torch.arange(start, min(start + chunk, len(image)))
        sims = image[rows] @ text.T  # [chunk, captions]
        top = ranked(sims, owner[None, :] == rows[:, None], k).tolist()
        for r, order in zip(rows.tolist(), top):
            lines.append({"query": "image", "id": emb.ids[r], "captions": [
                {"caption": emb.captions[j], "score": float(sims[r - start, j]), "correct": int(owner[j]) == r}
                for j in order]})
    k = min(top_k, len(image))
    for start in range(0, len(text), chunk):
        cols = torch.arange(start, min(start + chunk, len(text)))
        sims = text[cols] @ image.T  # [chunk, images]
        mine = owner[cols]
        top = ranked(sims, torch.arange(len(image))[None, :] == mine[:, None], k).tolist()
        for c, order in zip(cols.tolist(), top):
            lines.append({"query": "caption", "caption": emb.captions[c], "id": emb.ids[int(owner[c])], "images": [
                {"id": emb.ids[i], "score": float(sims[c - start, i]), "correct": i == int(owner[c])}
                for i in order]})
    return lines


def class_probabilities(result) -> torch.Tensor:
    """``[samples, classes]`` probabilities from the evaluation's class scores (see the module docstring)."""
    scores = result.scores.float()
    if result.task == "zeroshot":
        scores = scores * ZEROSHOT_SCALE
    return torch.softmax(scores, dim=-1)  # a class the probe never saw scores -inf: probability 0


def class_lines(result, top_k: int) -> list[dict[str, Any]]:
    """One line per image (or pair): the top class, its label and the top-k classes' probabilities."""
    names = result.class_names
    if result.samples is not None:  # classification: each pair's id and text
        samples = result.samples
    else:
        samples = [{"id": i} for i in result.embeddings.ids]
    probs = class_probabilities(result)
    k = min(top_k, probs.shape[1])
    best = torch.sort(probs, dim=-1, descending=True, stable=True).indices[:, :k].tolist()
    lines = []
    for sample, order, truth, row in zip(samples, best, result.labels.tolist(), probs):
        lines.append({**sample, "class": names[order[0]], "label": order[0],
                      "probabilities": {names[c]: float(row[c]) for c in order},
                      "true_class": names[truth] if 0 <= truth < len(names) else None, "true_label": truth})
    return lines


def vqa_lines(result, data) -> list[dict[str, Any]]:
    """One line per question asked: the row's id, the question's position in the row, the question, its id
    where the dataset keeps one, the answer and its score."""
    from vlkit.data.store import open_dataset

    ds = open_dataset(data)
    columns = ["id", "questions"] + (["question_id"] if "question_id" in ds.schema.names else [])
    table = ds.take(result.rows, columns=columns).to_pylist()
    asked = [(row, k, q) for row in table for k, q in enumerate(row["questions"] or [])]
    if len(asked) != len(result.samples):
        raise VlkitError(f"{data}: {len(result.samples)} answers for {len(asked)} questions; the dataset changed "
                         "during the run?")
    lines = []
    for (row, k, question), sample in zip(asked, result.samples):
        ids = row.get("question_id") or []
        qid = ids[k] if k < len(ids) else None
        line = {"id": row["id"], "question_index": k, "question": question, "answer": sample["answer"],
                "score": sample.get("score")}
        if "question_id" in row:
            line["question_id"] = qid
        lines.append(line)
    return lines


# ---------------------------------------------------------------------------------------------- the output file


def _record_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.vlkit.json")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def written_by_vlkit(path: str | Path) -> bool:
    """Whether ``path`` is a predictions file vlkit wrote and nobody changed since (its record's SHA-256)."""
    path = Path(path)
    try:
        record = json.loads(_record_path(path).read_text())
        return isinstance(record, dict) and record.get("kind") == "predictions" and record.get("sha256") == \
            _sha256(path)
    except (OSError, ValueError):
        return False


def check_output(path: str | Path, *, force: bool = False, inputs: list[str | Path] = ()) -> Path:
    """Raise unless ``path`` may be written: absent, an earlier vlkit predictions file (unchanged), or
    ``force``; never an input, a folder or a special file.

    Raises:
        VlkitError: naming the path and what to do.
    """
    from vlkit.utils.fs import check_output_file

    path = check_output_file(path, inputs=inputs, what="--out")
    if os.path.lexists(path) and not force and not written_by_vlkit(path):
        raise VlkitError(f"--out {path}: the file exists and vlkit did not write it (or it changed since); "
                         "pass --force to replace it, or name another file")
    return path


def write_predictions(path: str | Path, predictions: Predictions, *, force: bool = False,
                      inputs: list[str | Path] = ()) -> Path:
    """Write the predictions to ``path`` (beside, then renamed) and the record that vlkit wrote it."""
    from vlkit import __version__
    from vlkit.utils.fs import atomic_write

    path = check_output(path, force=force, inputs=inputs)  # again: it may have changed during the run
    atomic_write(path, predictions.text())
    record = {"kind": "predictions", "vlkit_version": __version__, "task": predictions.result.task,
              "format": predictions.format, "model_tag": predictions.result.model_tag, "sha256": _sha256(path)}
    atomic_write(_record_path(path), json.dumps(record) + "\n")
    return path
