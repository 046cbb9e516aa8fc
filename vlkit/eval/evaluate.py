"""Evaluate a trained model on one split of a dataset: retrieval, zero-shot classification, a linear probe,
image-text classification (:mod:`vlkit.eval.classify`), visual question answering, captioning or video
classification (:mod:`vlkit.eval.video`).

:func:`evaluate` checks that the data suits the task before the model is loaded, loads the model (a run, model
directory or checkpoint), runs the task and returns an :class:`EvalResult` that holds the metrics (named
``split/dataset/metric``) and what the report draws from (embeddings, class scores, written captions).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pyarrow.compute as pc
from torch import Tensor

from vlkit.data.store import OpenedDataset, open_dataset, split_indices
from vlkit.errors import DataError, VlkitError
from vlkit.metrics.classification import ClassificationMetrics
from vlkit.metrics.retrieval import RetrievalMetrics, retrieval_metrics
from vlkit.inference.embed import Embeddings, compute_embeddings
from vlkit.inference.loading import load_for_inference
from vlkit.tasks.labels import classes_present, require_labels

TASKS = ("retrieval", "zeroshot", "linear-probe", "classification", "nlvr2", "vqa", "captioning", "visdial",
         "video-classification")
#: what the captioning report and the COCO results need of each written caption
CAPTION_FIELDS = ("index", "id", "caption", "score", "references", "cider")


@dataclass
class EvalResult:
    """The outcome of one evaluation.

    Attributes:
        task: one of :data:`TASKS`.
        dataset: the dataset's path.
        split: the evaluated split.
        model: the directory the weights came from.
        model_tag: the fingerprint of the weights.
        metrics: scalar metrics named ``split/dataset/metric``.
        details: counts and task settings (images, captions, classes present and scored, chance, templates,
            C ...), JSON-ready.
        embeddings: the evaluated split's embeddings.
        retrieval: the retrieval metrics (retrieval only).
        classification: the classification metrics (zeroshot, linear-probe and classification).
        class_names: the classes by label (zeroshot, linear-probe and classification).
        scores: ``[images, classes]`` class scores (zeroshot, linear-probe and classification).
        labels: ``[images]`` true labels (zeroshot, linear-probe and classification).
        captions: one dict per captioned image (captioning only), in split order: ``index`` (position in the
            split), ``id``, ``caption`` (written), ``score`` (its log-probability), ``references`` and ``cider``
            (its CIDEr-D, times 100).
        samples: what each scored sample was, in order, for predictions (:mod:`vlkit.eval.predict`):
            classification: ``{"id", "text"}`` per row; vqa: ``{"answer", "answers"}`` per question.
        rows: vqa: the dataset row offsets of the questions asked, in order.
        seconds: wall time of the evaluation, model loading included.
    """

    task: str
    dataset: Path
    split: str
    model: str
    model_tag: str
    metrics: dict[str, float]
    details: dict[str, Any]
    embeddings: Embeddings | None = field(repr=False)
    retrieval: RetrievalMetrics | None = None
    classification: ClassificationMetrics | None = field(default=None, repr=False)
    class_names: list[str] = field(default_factory=list)
    scores: Tensor | None = field(default=None, repr=False)
    labels: Tensor | None = field(default=None, repr=False)
    captions: list[dict[str, Any]] | None = field(default=None, repr=False)
    samples: list[dict[str, Any]] | None = field(default=None, repr=False)
    rows: list[int] | None = field(default=None, repr=False)
    seconds: float = 0.0

    @property
    def prefix(self) -> str:
        """The metric-name prefix ``split/dataset/``."""
        return f"{self.split}/{dataset_name(self.dataset)}/"

    def summary(self) -> dict[str, Any]:
        """Everything a script wants to read, as JSON-ready values (NaN becomes None)."""
        out: dict[str, Any] = {
            "task": self.task, "model": self.model, "model_tag": self.model_tag, "dataset": str(self.dataset),
            "split": self.split, "metrics": self.metrics, **self.details, "seconds": round(self.seconds, 3),
        }
        if self.classification is not None:
            out["per_class_recall"] = {
                name: (None if math.isnan(v) else v)
                for name, v in zip(self.class_names, self.classification.per_class_recall.tolist())
            }
            if self.task in ("classification", "nlvr2", "video-classification"):  # few classes: the whole matrix
                out["confusion"] = {"classes": list(self.class_names), "matrix": self.classification.confusion.tolist()}
        return out


def class_details(class_names: Sequence[str], labels: Tensor) -> dict[str, Any]:
    """What a classification was about: the classes its images hold, and chance accuracy among them.

    The classifier scores every class of the dataset (``classes_scored``), but the evaluated images (a split,
    or its first ``--limit`` images) may hold fewer; ``classes`` and ``chance`` (percent, one over the classes
    present) count only those.
    """
    present = classes_present(labels.tolist(), class_names)
    return {"classes": len(present), "classes_present": present, "classes_scored": len(class_names),
            "chance": 100.0 / len(present) if present else None}


def dataset_name(path: str | Path) -> str:
    """The name used in metric keys: the dataset directory's name without ``.lance``."""
    path = Path(path)
    return path.stem if path.suffix == ".lance" else path.name


def _require_captions(dataset: str | Path | OpenedDataset, split: str, task: str = "retrieval",
                      limit: int | None = None) -> None:
    ds = open_dataset(dataset)
    offsets = (dataset.split(split) if isinstance(dataset, OpenedDataset) else split_indices(ds, split))[:limit]
    captions = ds.take(offsets, columns=["captions"]).column("captions")
    if not (pc.sum(pc.list_value_length(captions)).as_py() or 0):
        which = f"the first {limit} images of split '{split}' have" if limit is not None else f"split '{split}' has"
        need = "retrieval needs captions" if task == "retrieval" else "captioning is scored against reference captions"
        raise DataError(f"{dataset}: {which} no captions; {need} "
                        "(for a labelled dataset use --task zeroshot or --task linear-probe)")


def _require_questions(dataset: str | Path, split: str) -> None:
    ds = open_dataset(dataset)
    if "questions" not in ds.schema.names:
        raise DataError(f"{dataset}: no questions; VQA needs a dataset ingested from VQA questions")
    offsets = dataset.split(split) if isinstance(dataset, OpenedDataset) else split_indices(ds, split)
    questions = ds.take(offsets, columns=["questions"]).column("questions")
    if not (pc.sum(pc.list_value_length(questions)).as_py() or 0):
        raise DataError(f"{dataset}: split '{split}' has no questions")


def _require_embeddings_or_matching(loaded, task: str, rerank: int | None) -> None:
    """Refuse, before any image is read, a model that cannot do ``task`` for want of embeddings or a matching
    head (a fusion-only model such as ViLT has no image embeddings; re-ranking needs an ITM head)."""
    from vlkit.inference.matching import require_matching
    from vlkit.inference.embed import can_embed, require_embeddings

    if task in ("zeroshot", "linear-probe"):
        require_embeddings(loaded.model, f"--task {task}", text=task == "zeroshot")
    elif task == "retrieval" and rerank is not None:
        require_matching(loaded.model, "--rerank")
        if not can_embed(loaded.model):
            raise VlkitError(f"--rerank re-ranks the candidates of contrastive embeddings, which a "
                             f"{type(loaded.model).__name__} lacks; without --rerank its retrieval is scored by "
                             "ITM over every pair")


def _evaluate_retrieval(loaded, dataset: Path, split: str, base: dict, prefix: str, common: dict,
                        rerank: int | None, rerank_score: str = "itm+itc", frames: int = 0) -> EvalResult:
    """Recall@K both ways: by the contrastive embeddings, re-ranked by ITM (``rerank``), or, for a fusion-only
    model, by ITM over every image-caption pair; with ``frames``, between videos (the mean of ``frames``
    frames' embeddings) and captions, the metrics named ``t2v_*`` and ``v2t_*``."""
    from vlkit.inference.rerank import itm_retrieval, rerank_embeddings
    from vlkit.inference.embed import can_embed
    from vlkit.inference.video_embed import video_metric_names

    if frames and not can_embed(loaded.model):
        raise VlkitError(f"video retrieval embeds each video's frames, which a {type(loaded.model).__name__} "
                         "cannot (a fusion-only model); use a two-tower model, or --frames 0 for the middle frames")
    if not can_embed(loaded.model):
        itm = itm_retrieval(loaded, dataset, split, limit=common["limit"], batch_size=common["batch_size"],
                            num_workers=common["num_workers"], progress=common["progress"])
        details = {"images": len(itm.ids), "captions": len(itm.captions), "ranking": "itm",
                   "pairs": len(itm.ids) * len(itm.captions), "itm_seconds": round(itm.seconds, 3)}
        return EvalResult(**base, metrics=itm.metrics.as_dict(prefix), details=details, embeddings=None,
                          retrieval=itm.metrics)
    emb = compute_embeddings(loaded, dataset, split, captions=True, frames=frames, **common)
    m = retrieval_metrics(emb.image, emb.text, emb.caption_image)
    if frames:  # videos: no re-ranking (refused before the model was loaded)
        return EvalResult(**base, metrics=video_metric_names(m.as_dict(prefix)), embeddings=emb, retrieval=m,
                          details={"videos": len(emb.ids), "captions": len(emb.captions), "frames": frames})
    details: dict[str, Any] = {"images": len(emb.ids), "captions": len(emb.captions)}
    if rerank is None:
        return EvalResult(**base, metrics=m.as_dict(prefix), details=details, embeddings=emb, retrieval=m)
    done = rerank_embeddings(loaded, dataset, split, emb, rerank, batch_size=common["batch_size"],
                             num_workers=common["num_workers"], progress=common["progress"], score=rerank_score)
    after = done.metrics(emb.image, emb.text, emb.caption_image)
    metrics = {**after.as_dict(prefix), **{f"{k}_itc": v for k, v in m.as_dict(prefix).items()}}
    details.update(ranking="itc+itm", rerank=rerank, rerank_score=rerank_score, rerank_pairs=done.pairs,
                   rerank_seconds=round(done.seconds, 3),
                   rerank_note=f"each query's top {rerank} candidates by contrastive similarity re-ordered by "
                   + ("ITM probability" if rerank_score == "itm" else "ITM probability + contrastive similarity")
                   + "; the rest keep their contrastive order; metrics named ..._itc are before re-ranking")
    return EvalResult(**base, metrics=metrics, details=details, embeddings=emb, retrieval=after)


def _evaluate_vqa(loaded, dataset: Path, split: str, base: dict, prefix: str, batch_size: int,
                  limit: int | None, settings: dict[str, Any] | None, prompt: str | None) -> EvalResult:
    """VQA accuracy: the answer head's top answer, or the answer a generative model writes after its prompt.

    The majority baseline of an answer-head model answers every question with the most common training answer
    (the head's first); a generative model has no training answers, so its baseline takes the most common
    human answer of the evaluated questions themselves (``majority_from`` says which).
    """
    import contextlib

    from vlkit.data.answers import AnswerVocab
    from vlkit.data.dataset import LanceImageTextDataset
    from vlkit.inference.interface import is_generative
    from vlkit.metrics.vqa import vqa_metrics
    from vlkit.tasks.vqa import QA_COLUMNS, answer_questions, answer_settings, breakdown, model_answers, split_metrics
    from vlkit.train.distributed import DistInfo

    generative = is_generative(loaded.model)
    vocab = None if generative else model_answers(loaded.model)  # a clear error for a model with neither
    ds = LanceImageTextDataset(dataset, split, loaded.model.preprocess.image_transform(train=False), None,
                               captions="none", columns=QA_COLUMNS, require=["questions"])
    if limit is not None:
        ds.offsets = ds.offsets[:limit]
    if generative:
        given = {k: v for k, v in (settings or {}).items() if v is not None}
        options = answer_settings(given.get("num_beams", 1), given.get("max_new_tokens", 10))
        prompt = prompt if prompt is not None else loaded.generation.vqa_prompt
        answered = answer_questions(loaded.model, loaded.tokenizer, ds, DistInfo(), contextlib.nullcontext(),
                                    batch_size, prompt=prompt, settings=options)
    else:
        answered = answer_questions(loaded.model, loaded.tokenizer, ds, DistInfo(), contextlib.nullcontext(),
                                    batch_size)
    pairs = [(r.prediction, r.answers) for r in answered]
    human = [a for _, a in pairs]
    samples = [{"answer": r.prediction, "answers": r.answers, "score": r.score} for r in answered]
    m = split_metrics(answered)  # with answerability and answer types where the data has them
    metrics = {f"{prefix}vqa_acc": float(m.accuracy), **breakdown(m, prefix)}
    details: dict[str, Any] = {"images": len(ds), "questions": len(pairs), "generative": generative}
    if generative:
        asked = AnswerVocab.build(human)
        details["answers"] = len(asked)
        if len(asked):
            details.update(majority_answer=asked.majority(), majority_from=f"the answers of split '{split}'")
        details["decoding"] = options
    else:
        details.update(answers=len(vocab), majority_answer=vocab.majority(), majority_from="the training answers")
    if "majority_answer" in details:
        majority = vqa_metrics([details["majority_answer"]] * len(pairs), human)
        metrics[f"{prefix}vqa_majority_acc"] = float(majority.accuracy)
    return EvalResult(**base, metrics=metrics, details=details, embeddings=None, samples=samples,
                      rows=list(ds.offsets))


def _evaluate_captioning(loaded, dataset: Path, split: str, base: dict, prefix: str, batch_size: int,
                         limit: int | None, settings: dict[str, Any] | None, prompt: str | None, spice: bool,
                         progress: bool) -> EvalResult:
    """Write a caption for every image of the split and score those with reference captions."""
    import contextlib

    from vlkit.data.dataset import LanceImageTextDataset
    from vlkit.metrics.caption_tokenize import java_path
    from vlkit.metrics.captioning import caption_metrics
    from vlkit.tasks.captioning import caption_split
    from vlkit.train.distributed import DistInfo

    settings = loaded.generation.settings(**(settings or {}))  # the model's own defaults where none are given
    prompt = prompt if prompt is not None else loaded.generation.prompt
    ds = LanceImageTextDataset(dataset, split, loaded.model.preprocess.image_transform(train=False), None,
                               captions="all")
    if limit is not None:
        ds.offsets = ds.offsets[:limit]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(ds), desc="caption", unit="image", dynamic_ncols=True)
    try:
        rows = caption_split(loaded.model, loaded.tokenizer, ds, DistInfo(), contextlib.nullcontext(), batch_size,
                             prompt, settings, progress=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    scored = [r for r in rows if r["references"]]
    java = java_path() is not None
    m = caption_metrics([r["caption"] for r in scored], [r["references"] for r in scored], meteor=java,
                        spice=spice)
    for row, cider in zip(scored, m.cider_per_caption):
        row["cider"] = cider
    notes = [m.note] if m.note else []
    if not java:
        notes.append("METEOR omitted: it needs Java, and there is no `java` on PATH")
    if not spice:
        notes.append("SPICE omitted (pass --spice to compute it; it needs Java and the Stanford CoreNLP jars)")
    details = {"images": len(rows), "captioned_images": len(scored),
               "references": sum(len(r["references"]) for r in scored), "tokenizer": m.tokenizer,
               "decoding": dict(settings or {}), "prompt": prompt, "note": "; ".join(notes)}
    captions = [{k: r.get(k) for k in CAPTION_FIELDS} for r in rows]
    return EvalResult(**base, metrics=m.as_dict(prefix), details=details, embeddings=None, captions=captions)


def evaluate(model_path: str | Path, task: str, dataset: str | Path, split: str = "test", *,
             train_split: str = "train", templates: Sequence[str] | None = None, batch_size: int = 64,
             limit: int | None = None, num_workers: int = 0, progress: bool = False,
             settings: dict[str, Any] | None = None, prompt: str | None = None, spice: bool = False,
             rerank: int | None = None, rerank_score: str = "itm+itc", precision: str = "auto",
             clips: int = 1, frames: int | None = None) -> EvalResult:
    """Evaluate a run, model directory or checkpoint on ``split`` of ``dataset``.

    Args:
        model_path: a run directory, a model directory or a training checkpoint.
        task: ``retrieval`` (recall@K both ways), ``zeroshot`` (classification by prompts),
            ``linear-probe`` (logistic regression on frozen image embeddings, fitted on ``train_split``),
            ``classification`` (accuracy, per-class recall and confusion of the classification head trained
            with the model, on (image, caption) pairs such as SNLI-VE's), ``nlvr2`` (accuracy of the NLVR2 head
            trained with the model on rows of two images and a sentence: :mod:`vlkit.eval.pairs`),
            ``vqa`` (VQA accuracy of an answer head or of generated answers), ``captioning`` (BLEU-1..4,
            METEOR, ROUGE-L, CIDEr-D of generated captions against the references) or ``visdial`` (the answer
            options of every dialog round ranked by the ITM head: MRR, R@1/5/10, mean rank, NDCG;
            :mod:`vlkit.eval.dialog`) or ``video-classification`` (top-1/top-5, per-class recall and confusion
            of a video classifier over ``clips`` clips per video: :mod:`vlkit.eval.video`).
        dataset: a vlkit Lance dataset.
        split: the split to evaluate.
        train_split: the split the linear probe is fitted on.
        templates: zero-shot prompt templates (default: the built-in set).
        batch_size: images per forward pass.
        limit: evaluate only the first ``limit`` images of ``split``.
        num_workers: image decoding worker processes.
        progress: show progress bars.
        settings: decoding options of :func:`vlkit.inference.generate.generate` (captioning; ``num_beams``
            and ``max_new_tokens`` for generated VQA answers).
        prompt: the decoder's prompt (captioning: a caption prefix; vqa: a template with ``{question}``).
        spice: also compute SPICE (captioning; needs Java and the Stanford CoreNLP jars).
        rerank: retrieval: re-rank each query's top ``rerank`` candidates with the model's ITM head
            (:mod:`vlkit.inference.rerank`, ordered by ``rerank_score``: ``itm`` or ``itm+itc``); the metrics are
            those after re-ranking, and the contrastive ones
            are kept under ``..._itc`` names.
        precision: what embeddings are computed in (``auto``, ``fp32``, ``bf16``; see
            :mod:`vlkit.inference.speed`).
        clips: video-classification: clips per video, their scores averaged (:mod:`vlkit.eval.video`).
        frames: retrieval: frames sampled per video of a video dataset (default 8), their embeddings
            mean-pooled; 0 evaluates the middle frames as images (:mod:`vlkit.inference.video_embed`).

    Raises:
        VlkitError: unknown task, bad limit or batch size, no such run/model/checkpoint, or a model that
            cannot do the task (captioning needs a text decoder, re-ranking a matching head, zero-shot and
            the linear probe image embeddings).
        DataError: no such dataset or split, or the split lacks what the task needs (captions, labels).
    """
    if task not in TASKS:
        raise VlkitError(f"unknown task '{task}'; choose one of {', '.join(TASKS)}")
    if limit is not None and limit < 1:
        raise VlkitError(f"--limit must be at least 1, got {limit}")
    if batch_size < 1:
        raise VlkitError(f"--batch-size must be at least 1, got {batch_size}")
    if clips < 1:
        raise VlkitError(f"--clips must be at least 1, got {clips}")
    if rerank_score not in ("itm", "itm+itc"):
        raise VlkitError(f"unknown --rerank-score {rerank_score!r}; choose itm or itm+itc")
    if rerank is not None and (task != "retrieval" or rerank < 1):
        raise VlkitError("--rerank applies to --task retrieval only" if task != "retrieval"
                         else f"--rerank must be at least 1, got {rerank}")
    from vlkit.inference.speed import PRECISIONS

    if precision not in PRECISIONS:
        raise VlkitError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    start = time.perf_counter()
    data = OpenedDataset.open(dataset)  # opened once for every check and the evaluation itself
    dataset = data.path
    data.split(split)  # the split exists
    if task in ("retrieval", "captioning"):
        _require_captions(data, split, task, limit if task == "captioning" else None)
    if task == "retrieval":  # videos or images, decided before the model is loaded
        from vlkit.inference.video_embed import retrieval_frames

        frames = retrieval_frames(data, split, frames, limit, rerank)
    elif frames is not None:
        raise VlkitError("--frames applies to --task retrieval only")
    elif task == "vqa":
        _require_questions(data, split)
    elif task == "visdial":  # dialog rounds with answer options (vlkit.eval.dialog)
        from vlkit.eval.dialog import require_dialogs

        require_dialogs(data, split, limit)
    elif task == "nlvr2":  # pairs of images with a sentence and a true/false label (vlkit.eval.pairs)
        from vlkit.eval.pairs import require_pairs

        require_pairs(data, split, limit)
    elif task == "video-classification":  # labelled videos (vlkit.eval.video)
        from vlkit.eval.video import check_videos

        check_videos(data, split, limit)
    else:  # checked again by the task; here before the model is loaded, so that a data error comes at once
        require_labels(data, split, {"zeroshot": "zero-shot classification", "classification":
                                     "--task classification"}.get(task, "the linear probe"))
    loaded = load_for_inference(model_path)
    loaded.precision = precision
    if task == "captioning":
        from vlkit.inference.interface import require_generative

        require_generative(loaded.model)
    _require_embeddings_or_matching(loaded, task, rerank)
    common = dict(batch_size=batch_size, limit=limit, num_workers=num_workers, progress=progress)
    base = dict(task=task, dataset=dataset, split=split, model=str(loaded.source), model_tag=loaded.tag)
    prefix = f"{split}/{dataset_name(dataset)}/"
    if task == "retrieval":
        result = _evaluate_retrieval(loaded, data, split, base, prefix, common, rerank, rerank_score, frames)
    elif task == "zeroshot":
        from vlkit.tasks.zeroshot import evaluate_zeroshot

        zs = evaluate_zeroshot(loaded, data, split, templates=templates, **common)
        details = {"images": zs.metrics.num_samples, **class_details(zs.class_names, zs.labels),
                   "templates": zs.templates}
        result = EvalResult(**base, metrics=zs.metrics.as_dict(prefix), details=details, embeddings=zs.embeddings,
                            classification=zs.metrics, class_names=zs.class_names, scores=zs.scores,
                            labels=zs.labels)
    elif task == "visdial":
        from vlkit.eval.dialog import evaluate_dialog

        result = evaluate_dialog(loaded, data, split, base, prefix, batch_size, limit, progress)
    elif task == "nlvr2":
        from vlkit.eval.pairs import evaluate_nlvr2

        result = evaluate_nlvr2(loaded, data, split, base, prefix, batch_size, limit, num_workers, progress)
    elif task == "classification":
        from vlkit.eval.classify import evaluate_classification

        result = evaluate_classification(loaded, data, split, base, prefix, batch_size, limit, num_workers, progress)
    elif task == "video-classification":
        from vlkit.eval.video import evaluate_video_classification

        result = evaluate_video_classification(loaded, data, split, base, prefix, batch_size, limit, num_workers,
                                               clips)
    elif task == "vqa":
        result = _evaluate_vqa(loaded, data, split, base, prefix, batch_size, limit, settings, prompt)
    elif task == "captioning":
        result = _evaluate_captioning(loaded, data, split, base, prefix, batch_size, limit, settings, prompt,
                                      spice, progress)
    else:
        from vlkit.tasks.linear_probe import evaluate_linear_probe

        lp = evaluate_linear_probe(loaded, data, split, train_split=train_split, **common)
        details = {"images": lp.metrics.num_samples, **class_details(lp.class_names, lp.labels),
                   "train_split": train_split,
                   "train_images": lp.fit.num_train, "C": lp.fit.c,
                   "holdout_accuracy": {f"{c:g}": acc for c, acc in lp.fit.holdout_accuracy.items()}}
        result = EvalResult(**base, metrics=lp.metrics.as_dict(prefix), details=details, embeddings=lp.embeddings,
                            classification=lp.metrics, class_names=lp.class_names, scores=lp.scores,
                            labels=lp.labels)
    result.seconds = time.perf_counter() - start
    return result
