"""The questions of a VQA batch and how they go into an answer-head model.

A row of a vlkit dataset is one image with its ``questions`` and, per question, its human ``answers``. Optional
columns add to that:

- ``answerable`` and ``answer_type`` (VizWiz): per question, aligned with ``questions``; a row whose lists do
  not line up with its questions is read as if it had none;
- ``ocr_tokens`` (TextVQA): the words read in the image. They are given to the model as extra text, the second
  sequence of a pair after the question (``[CLS] question [SEP] ocr tokens [SEP]``), and, for a model built
  with ``ocr_pointer``, the answer head also scores each token as the answer: the output is the vocabulary's
  logits followed by :data:`MAX_OCR_SLOTS` at most token scores, and an answer may be copied from the tokens.
  A generative model reads them in its prompt, after the question (:func:`with_ocr_text`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from vlkit.data.answers import AnswerVocab, ocr_targets

#: the columns every VQA dataset has
QA_COLUMNS = ["questions", "answers"]
#: the columns a VQA dataset may have, read when present
OPTIONAL_QA_COLUMNS = ("answerable", "answer_type", "ocr_tokens")
#: most OCR tokens a pointer scores per question (M4C's 50)
MAX_OCR_SLOTS = 50
#: most OCR tokens written into a generative model's prompt (its text is short)
MAX_PROMPT_OCR = 20
#: what separates the question from its OCR tokens in a prompt
PROMPT_OCR_SEPARATOR = " ocr: "


def qa_columns(path: str) -> list[str]:
    """:data:`QA_COLUMNS` and those of :data:`OPTIONAL_QA_COLUMNS` the dataset at ``path`` has."""
    import lance

    names = lance.dataset(str(path)).schema.names
    return list(QA_COLUMNS) + [c for c in OPTIONAL_QA_COLUMNS if c in names]


@dataclass
class QuestionBatch:
    """The questions of a batch, one entry per question.

    Attributes:
        owner: position of the question's image in the batch.
        questions: the question texts.
        answers: the human answers of each question.
        answerable: whether the image can answer it (None: not known).
        answer_types: its answer type (None: not known).
        ocr_tokens: the words read in its image (None: the dataset has no OCR tokens).
    """

    owner: list[int] = field(default_factory=list)
    questions: list[str] = field(default_factory=list)
    answers: list[list[str]] = field(default_factory=list)
    answerable: list[bool | None] = field(default_factory=list)
    answer_types: list[str | None] = field(default_factory=list)
    ocr_tokens: list[list[str]] | None = None

    def __len__(self) -> int:
        return len(self.questions)

    def part(self, part: slice) -> "QuestionBatch":
        """The questions of ``part`` (a slice)."""
        return QuestionBatch(self.owner[part], self.questions[part], self.answers[part], self.answerable[part],
                             self.answer_types[part], None if self.ocr_tokens is None else self.ocr_tokens[part])


def _aligned(values: Any, count: int) -> list:
    """A per-question list when it has one entry per question, else ``count`` Nones."""
    values = list(values) if isinstance(values, (list, tuple)) else []
    return values if len(values) == count else [None] * count


def question_batch(batch: dict[str, Any], pick: Callable[[int, int], int] | None = None) -> QuestionBatch:
    """The questions of a batch: one per image drawn with ``pick(row index, count)``, or all (``pick=None``)."""
    out = QuestionBatch(ocr_tokens=[] if "ocr_tokens" in batch else None)
    for pos, (qs, ans) in enumerate(zip(batch["questions"], batch["answers"])):
        qs, ans = list(qs or []), list(ans or [])
        answerable = _aligned(batch["answerable"][pos], len(qs)) if "answerable" in batch else [None] * len(qs)
        types = _aligned(batch["answer_type"][pos], len(qs)) if "answer_type" in batch else [None] * len(qs)
        chosen = range(len(qs)) if pick is None else [pick(batch["index"][pos].item(), len(qs))]
        for q in chosen:
            out.owner.append(pos)
            out.questions.append(qs[q])
            out.answers.append(list(ans[q] or []) if q < len(ans) else [])
            out.answerable.append(None if answerable[q] is None else bool(answerable[q]))
            out.answer_types.append(None if types[q] is None else str(types[q]))
            if out.ocr_tokens is not None:
                out.ocr_tokens.append([str(t) for t in (batch["ocr_tokens"][pos] or [])])
    return out


def with_ocr_text(qb: QuestionBatch) -> list[str]:
    """The questions as a generative model reads them: each followed by :data:`PROMPT_OCR_SEPARATOR` and its
    first :data:`MAX_PROMPT_OCR` OCR tokens when the dataset has OCR tokens (a question of an image where none
    were read stays as it is)."""
    if qb.ocr_tokens is None:
        return list(qb.questions)
    return [q.strip() + PROMPT_OCR_SEPARATOR + " ".join(t[:MAX_PROMPT_OCR]) if t else q
            for q, t in zip(qb.questions, qb.ocr_tokens)]


def has_pointer(model: nn.Module) -> bool:
    """Whether a model's answer head also scores OCR tokens (built with ``ocr_pointer``)."""
    return getattr(model, "ocr_pointer", None) is not None


@dataclass
class AnswerInputs:
    """What an answer-head model takes for some questions: ``args`` and ``kwargs`` of its forward (with
    ``head="answer"``), and the OCR tokens each pointer slot holds (None without a pointer)."""

    args: tuple[Tensor, Tensor, Tensor]
    kwargs: dict[str, Any]
    slots: list[list[str]] | None


def head_inputs(tokenizer, images: Tensor, qb: QuestionBatch, pointer: bool, device) -> AnswerInputs:
    """Tokenise the questions (with their OCR tokens as the second sequence when the dataset has them) and
    gather their images.

    Args:
        tokenizer: a :class:`~vlkit.data.text.TextTokenizer`.
        images: ``[batch, 3, H, W]`` the batch's images (``qb.owner`` indexes them).
        qb: the questions.
        pointer: the model scores OCR tokens (their positions are passed as ``ocr_positions``).
        device: where the tensors go.
    """
    picked = images[torch.tensor(qb.owner, dtype=torch.long)].to(device, non_blocking=True)
    if qb.ocr_tokens is None:
        tokens = tokenizer(qb.questions)
        return AnswerInputs((picked, tokens["input_ids"].to(device), tokens["attention_mask"].to(device)), {}, None)
    words = [t[:MAX_OCR_SLOTS] for t in qb.ocr_tokens]
    tokens = tokenizer.encode_with_words(qb.questions, words)
    args = (picked, tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
    if not pointer:
        return AnswerInputs(args, {}, None)
    positions = tokens["word_positions"]  # [questions, K]
    if positions.shape[1] == 0:  # no question of the batch has a token: one empty slot keeps shapes regular
        positions = torch.full((len(qb), 1), -1, dtype=torch.long)
    slots = [[w if positions[i, k] >= 0 else "" for k, w in enumerate(words[i][: positions.shape[1]])]
             for i in range(len(qb))]
    return AnswerInputs(args, {"ocr_positions": positions.to(device)}, slots)


def answer_targets(vocab: AnswerVocab, qb: QuestionBatch, inputs: AnswerInputs) -> Tensor:
    """Soft targets ``[questions, answers (+ slots)]``: the vocabulary's, then the pointer's slots that hold a
    token equal to a human answer (a token cut off by the text length is never a target)."""
    vocab_part = torch.stack([vocab.targets(a) for a in qb.answers])  # [questions, answers]
    if inputs.slots is None:
        return vocab_part
    width = inputs.kwargs["ocr_positions"].shape[1]
    copy = torch.stack([ocr_targets(a, s, width) for a, s in zip(qb.answers, inputs.slots)])  # [questions, K]
    return torch.cat([vocab_part, copy], dim=1)


def decode_answers(logits: Tensor, vocab: AnswerVocab, slots: list[list[str]] | None) -> list[str]:
    """The top answer of each row of ``logits``: a vocabulary answer, or the OCR token of a pointer slot."""
    best = logits.float().argmax(dim=-1).tolist()
    out = []
    for i, j in enumerate(best):
        if j < len(vocab):
            out.append(vocab.answers[j])
        else:
            row = slots[i] if slots is not None else []
            k = j - len(vocab)
            out.append(row[k] if k < len(row) else "")
    return out

