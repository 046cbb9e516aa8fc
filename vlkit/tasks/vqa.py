"""Visual question answering: answer classification over a vocabulary built from the training answers.

Training takes one question per image per epoch (a new draw every epoch, seeded by ``(seed, epoch, row)``) and
a soft target per answer, ``min(humans who gave it / 3, 1)``; the loss is binary cross-entropy summed over the
answers. Evaluation answers every question of the validation split with the top-scoring answer and reports
the standard VQA accuracy (with the official answer normalisation) beside the majority-answer baseline.

The model is either a fusion model built with ``answers`` (the trainer does this for a config with a VQA task),
whose ``forward(images, input_ids, attention_mask, head="answer")`` returns answer logits, or a generative model
(a text decoder, see :mod:`vlkit.inference.interface`) that writes the answer after a prompt
``question: ... answer:`` (the task's ``prompt``, with ``{question}`` where the question goes, replaces it;
OCR tokens, where the dataset has them, follow the question there as ``... ocr: tok tok``):
trained by teacher forcing on one human answer per question (drawn in proportion to how many people gave it),
evaluated on the answers it generates, normalised as the official evaluation does.

Datasets with VizWiz's ``answerable`` report the accuracy on answerable and on unanswerable questions apart
(``vqa_acc_answerable``, ``vqa_acc_unanswerable``; "unanswerable" is an answer of the vocabulary), and those
with ``answer_type`` the accuracy per answer type (``vqa_acc_type_yes_no``, ``vqa_acc_type_number``, ...). Datasets
with TextVQA's ``ocr_tokens`` give the tokens to the model after the question, and a model built with
``ocr_pointer`` may answer with one of them (see :mod:`vlkit.tasks.vqa_inputs`).
"""

from __future__ import annotations

import contextlib
import copy
import random
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlkit.config.schema import TaskConfig
from vlkit.data.answers import AnswerVocab
from vlkit.data.dataset import LanceImageTextDataset, make_loader
from vlkit.data.sampler import DistributedEpochSampler
from vlkit.errors import VlkitError
from vlkit.inference.captions import VQA_PROMPT, write_captions
from vlkit.inference.interface import is_generative
from vlkit.metrics.vqa import vqa_metrics
from vlkit.modules.losses.captioning import caption_loss
from vlkit.tasks import register_task
from vlkit.tasks.base import Task
from vlkit.tasks.retrieval import _no_sync
from vlkit.tasks.vqa_inputs import QA_COLUMNS  # noqa: F401 (re-exported: vlkit eval reads it from here)
from vlkit.tasks.vqa_inputs import (OPTIONAL_QA_COLUMNS, answer_targets, decode_answers, has_pointer, head_inputs,
                                    qa_columns, question_batch, with_ocr_text)
from vlkit.train.distributed import unwrap
from vlkit.train.distributed import DistInfo, all_gather_objects


def vqa_prompts(questions: list[str], template: str | None = None) -> list[str]:
    """The decoder prompts of ``questions`` (``template`` with ``{question}``; default :data:`VQA_PROMPT`)."""
    template = template or VQA_PROMPT
    if "{question}" not in template:
        raise VlkitError(f"the vqa prompt {template!r} has no {{question}} placeholder")
    return [template.replace("{question}", q.strip()) for q in questions]


def model_answers(model: nn.Module) -> AnswerVocab:
    """The answer vocabulary a model was built with, or a clear error."""
    answers = list(getattr(getattr(unwrap(model), "config", None), "answers", None) or [])
    if not answers:
        raise VlkitError(f"{type(unwrap(model)).__name__} has no answer head: VQA needs a fusion model "
                         "(albef-*, vilt-*) built with the training answers")
    return AnswerVocab(answers)


def expand_questions(batch: dict[str, Any], pick: Callable[[int, int], int] | None = None
                     ) -> tuple[list[int], list[str], list[list[str]]]:
    """Questions of a batch: one per image drawn with ``pick``, or all of them (``pick=None``).

    Returns:
        ``(image position in the batch, question, human answers)`` as three lists.
    """
    qb = question_batch(batch, pick)
    return qb.owner, qb.questions, qb.answers


@register_task("vqa")
class VQATask(Task):
    """VQA as soft answer classification on one dataset (rows with ``questions`` and ``answers``).

    Args: as :class:`vlkit.tasks.base.Task`.
    """

    _vocab: AnswerVocab | None = None  # the model's answers, read once (they are fixed when the model is built)

    @classmethod
    def reads(cls, cfg: TaskConfig) -> list[str]:
        return list(QA_COLUMNS)

    def vocab(self, model: nn.Module) -> AnswerVocab:
        if self._vocab is None:
            self._vocab = model_answers(model)
        return self._vocab

    # ------------------------------------------------------------------ data
    def dataset(self, split: str, train: bool) -> LanceImageTextDataset:
        transform = self.preprocess.image_transform(train=train and self.augment)
        return LanceImageTextDataset(self.data.path, split, transform, None, captions="none", seed=self.seed,
                                     columns=qa_columns(self.data.path), require=["questions"])

    def train_loader(self, per_rank_batch: int) -> torch.utils.data.DataLoader:
        return self.shuffled_loader(self.dataset(self.data.train_split, train=True), per_rank_batch)

    def _pick(self, index: int, count: int) -> int:
        return random.Random(f"{self.seed}:vqa:{self.train_set.epoch}:{index}").randrange(count)

    # ------------------------------------------------------------------ loss
    def forward_backward(self, model: nn.Module, batch: dict[str, Any], micro_batches: int, autocast,
                         loss_scale: float = 1.0, scaler=None) -> dict[str, float]:
        if is_generative(model):
            return self._generative_step(model, batch, micro_batches, autocast, loss_scale, scaler)
        vocab = self.vocab(model)
        qb = question_batch(batch, self._pick)
        pointer = has_pointer(unwrap(model))
        size = -(-len(qb) // micro_batches)  # micro-batches of questions; the loss is a mean, so weight them
        total = 0.0
        starts = list(range(0, len(qb), size))
        for n, start in enumerate(starts):
            part = qb.part(slice(start, start + size))
            weight = len(part) / len(qb)
            inputs = head_inputs(self.tokenizer, batch["image"], part, pointer, self.dist.device)
            targets = answer_targets(vocab, part, inputs).to(self.dist.device)  # [questions, answers (+ slots)]
            sync = _no_sync(model) if n < len(starts) - 1 else contextlib.nullcontext()
            with sync:
                with autocast:
                    logits = model(*inputs.args, head="answer", **inputs.kwargs)
                    loss = vqa_loss(logits.float(), targets)
                scaled = loss * self.cfg.weight * loss_scale * weight
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            total += float(loss.detach()) * weight
        return {"loss": total}

    def _generative_step(self, model: nn.Module, batch: dict[str, Any], micro_batches: int, autocast,
                         loss_scale: float, scaler) -> dict[str, float]:
        """Teacher forcing on ``prompt answer`` for one question per image and one answer per question."""
        inner = unwrap(model)
        qb = question_batch(batch, self._pick)
        owner, questions, answers = qb.owner, with_ocr_text(qb), qb.answers
        picked = [self._pick_answer(batch["index"][o].item(), a) for o, a in zip(owner, answers)]
        keep = [i for i, a in enumerate(picked) if a]
        if not keep:
            raise VlkitError(f"dataset {self.key}: a training batch has no answered question")
        prompts = vqa_prompts([questions[i] for i in keep], self.cfg.prompt)
        targets = [picked[i] for i in keep]
        images_all = batch["image"][torch.tensor([owner[i] for i in keep], dtype=torch.long)]
        size = -(-len(keep) // micro_batches)
        total = 0.0
        starts = list(range(0, len(keep), size))
        for n, start in enumerate(starts):
            part = slice(start, start + size)
            weight = len(targets[part]) / len(targets)
            ids, mask, labels = answer_inputs(self.tokenizer, inner.generation, prompts[part], targets[part])
            device = self.dist.device
            sync = _no_sync(model) if n < len(starts) - 1 else contextlib.nullcontext()
            with sync:
                with autocast:
                    logits = model(images_all[part].to(device, non_blocking=True), ids.to(device), mask.to(device),
                                   head="caption")
                    loss = caption_loss(logits, labels.to(device), self.cfg.label_smoothing).loss
                scaled = loss * self.cfg.weight * loss_scale * weight
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            total += float(loss.detach()) * weight
        return {"loss": total}

    def _pick_answer(self, index: int, answers: list[str]) -> str | None:
        """One of the human answers, drawn in proportion to how many gave it (seeded by epoch and row)."""
        answers = [a for a in answers if a and a.strip()]
        if not answers:
            return None
        return random.Random(f"{self.seed}:vqa-answer:{self.train_set.epoch}:{index}").choice(answers)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, model: nn.Module, autocast, batch_size: int = 64) -> dict[str, float]:
        """VQA accuracy on the validation split's questions (every rank answers its share)."""
        if not self.data.val_split:
            return {}
        ds = self.dataset(self.data.val_split, train=False)
        if is_generative(model):
            result = answer_questions(model, self.tokenizer, ds, self.dist, autocast, batch_size,
                                      prompt=self.cfg.prompt,
                                      settings=answer_settings(self.cfg.num_beams, self.cfg.max_new_tokens))
        else:
            result = answer_questions(model, self.tokenizer, ds, self.dist, autocast, batch_size)
        metrics = split_metrics(result)
        out = {f"val/{self.key}/vqa_acc": float(metrics.accuracy)}
        if not is_generative(model):  # the majority answer of the training answers (the head's vocabulary)
            baseline = vqa_metrics([self.vocab(model).majority()] * len(result), [r.answers for r in result])
            out[f"val/{self.key}/vqa_majority_acc"] = float(baseline.accuracy)
        out[f"val/{self.key}/vqa_questions"] = float(len(result))
        out.update(breakdown(metrics, f"val/{self.key}/"))
        return out


def breakdown(metrics, prefix: str) -> dict[str, float]:
    """The accuracy on answerable and unanswerable questions (``vqa_acc_answerable``, ``vqa_acc_unanswerable``)
    and per answer type (``vqa_acc_type_yes_no`` ...), where the data tells them, named under ``prefix``."""
    out: dict[str, float] = {}
    if metrics.answerable_accuracy is not None:
        out[f"{prefix}vqa_acc_answerable"] = float(metrics.answerable_accuracy)
    if metrics.unanswerable_accuracy is not None:
        out[f"{prefix}vqa_acc_unanswerable"] = float(metrics.unanswerable_accuracy)
    for kind, acc in metrics.per_answer_type.items():  # "yes/no" -> vqa_acc_type_yes_no
        out[f"{prefix}vqa_acc_type_{re.sub(r'[^0-9A-Za-z]+', '_', kind).strip('_')}"] = float(acc)
    return out


@dataclass
class AnsweredQuestion:
    """One evaluated question: the predicted answer, the human answers, and what the dataset says about it."""

    prediction: str
    answers: list[str]
    answerable: bool | None = None
    answer_type: str | None = None
    score: float | None = None  # the answer head's sigmoid probability, or a written answer's log-probability


def split_metrics(result: list[AnsweredQuestion]):
    """:func:`~vlkit.metrics.vqa.vqa_metrics` of answered questions, with answerability and answer types when
    the dataset has them."""
    known = any(r.answerable is not None for r in result)
    typed = any(r.answer_type is not None for r in result)
    return vqa_metrics([r.prediction for r in result], [r.answers for r in result],
                       answer_types=[r.answer_type for r in result] if typed else None,
                       answerable=[r.answerable for r in result] if known else None)


def vqa_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Binary cross-entropy with soft targets, summed over answers and averaged over questions."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / max(1, logits.shape[0])


def answer_settings(num_beams: int = 1, max_new_tokens: int = 10) -> dict[str, Any]:
    """Decoding options for short answers."""
    return {"num_beams": num_beams, "max_new_tokens": min(max_new_tokens, 10), "min_new_tokens": 1}


def answer_inputs(tokenizer, spec, prompts: list[str], answers: list[str]):
    """``[bos] prompt answer [eos]`` per question, with labels on the answer and the end token only.

    Returns:
        ``(input_ids, attention_mask, labels)``, each ``[questions, length]``.
    """
    from vlkit.inference.captions import prompt_ids
    from vlkit.modules.losses.captioning import IGNORE_INDEX

    rows, starts = [], []
    for prompt, answer in zip(prompts, answers):
        head = [spec.bos_token_id, *prompt_ids(tokenizer, prompt)]
        tail = tokenizer.encode_plain(answer) + [spec.eos_token_id]
        row = (head + tail)[: spec.max_length]
        if len(head) >= len(row):
            raise VlkitError(f"the question prompt {prompt[:60]!r} fills the decoder's {spec.max_length} tokens")
        rows.append(row)
        starts.append(len(head))
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), spec.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for i, (row, start) in enumerate(zip(rows, starts)):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        labels[i, start - 1: len(row) - 1] = torch.tensor(row[start:])  # position t predicts token t + 1
    return ids, mask, labels


def answer_split(model: nn.Module, tokenizer, ds: LanceImageTextDataset, dist: DistInfo, autocast,
                 batch_size: int = 64, prompt: str | None = None,
                 settings: dict[str, Any] | None = None) -> list[tuple[str, list[str]]]:
    """``(predicted answer, human answers)`` for every question of ``ds``, in dataset order (see
    :func:`answer_questions`)."""
    return [(r.prediction, r.answers)
            for r in answer_questions(model, tokenizer, ds, dist, autocast, batch_size, prompt, settings)]


def _with_optional_columns(ds: LanceImageTextDataset) -> LanceImageTextDataset:
    """``ds``, or a copy that also reads the optional VQA columns (answerability, OCR tokens) its data has."""
    wanted = [c for c in qa_columns(ds.path) if c in OPTIONAL_QA_COLUMNS and c not in ds.columns]
    if not wanted:
        return ds
    ds = copy.copy(ds)
    ds.columns = list(ds.columns) + wanted
    return ds


def answer_questions(model: nn.Module, tokenizer, ds: LanceImageTextDataset, dist: DistInfo, autocast,
                     batch_size: int = 64, prompt: str | None = None,
                     settings: dict[str, Any] | None = None) -> list[AnsweredQuestion]:
    """Every question of ``ds`` answered, in dataset order: the top answer of the answer head (over the
    vocabulary and, for a model with an OCR pointer, the question's OCR tokens), or the answer a generative
    model writes after its prompt (``prompt``, ``settings``). The optional VQA columns the dataset has are read
    even when ``ds`` was opened without them."""
    generative = is_generative(model)
    vocab = None if generative else model_answers(model)
    ds = _with_optional_columns(ds)
    sampler = DistributedEpochSampler(len(ds), dist.world_size, dist.rank, shuffle=False)
    loader = make_loader(ds, batch_size, sampler, num_workers=0)
    inner = unwrap(model)
    was_training = inner.training
    inner.eval()
    rows: list[tuple[int, list[AnsweredQuestion]]] = []
    pointer = not generative and has_pointer(inner)
    for batch in loader:
        qb = question_batch(batch)
        with autocast:
            if generative:  # the questions go into the prompts, tokenised there
                images = batch["image"][torch.tensor(qb.owner, dtype=torch.long)].to(dist.device)
                written = write_captions(inner, tokenizer, images, vqa_prompts(with_ocr_text(qb), prompt),
                                         **(settings or answer_settings()))
                predicted, scores = [w[0][0] for w in written], [float(w[0][1]) for w in written]
            else:
                inputs = head_inputs(tokenizer, batch["image"], qb, pointer, dist.device)
                logits = inner(*inputs.args, head="answer", **inputs.kwargs)
                predicted = decode_answers(logits, vocab, inputs.slots)
                scores = logits.float().max(dim=-1).values.sigmoid().tolist()  # the head is trained with BCE
        per_image: dict[int, list] = {}
        for i, pos in enumerate(qb.owner):
            per_image.setdefault(pos, []).append(AnsweredQuestion(predicted[i], qb.answers[i], qb.answerable[i],
                                                                  qb.answer_types[i], scores[i]))
        for pos, index in enumerate(batch["index"].tolist()):
            rows.append((index, per_image.get(pos, [])))
    inner.train(was_training)
    merged = {index: qa for part in all_gather_objects(rows) for index, qa in part}  # drops padding
    return [qa for index in sorted(merged) for qa in merged[index]]
