"""The answer vocabulary of a VQA classifier: normalised training answers, most frequent first.

A vocabulary built with :meth:`AnswerVocab.build` counts every human answer of every training question (after
:func:`vlkit.metrics.vqa.normalize_answer`), keeps those given at least ``min_count`` times, and orders them by
count, descending, then alphabetically, so the same answers always give the same indices. Its first answer is
the most common one, the prediction of the majority baseline.

VizWiz's questions that the image cannot answer have the answer :data:`UNANSWERABLE`, an answer like any other,
so a vocabulary built from VizWiz answers holds it and a model predicts it. Answers copied from the words read in
the image (TextVQA) are scored by :func:`ocr_targets` beside the vocabulary.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor

from vlkit.errors import VlkitError
from vlkit.metrics.vqa import normalize_answer, soft_targets

_FORMAT = "vlkit-answer-vocab/1"


class AnswerVocab:
    """An ordered list of answers with index look-up by normalised answer.

    Args:
        answers: the answers in index order (as a classifier head's outputs are ordered). They are kept as
            given; look-ups compare normalised forms, so two answers with the same normal form are an error.
        counts: optional training count of each answer (set by :meth:`build`).

    Raises:
        VlkitError: ``counts`` has another length than ``answers``, or two answers normalise alike.

    Example:
        >>> vocab = AnswerVocab.build([["yes", "yes", "no"], ["Two", "2", "yes"]])
        >>> vocab.answers, vocab.index("two")
        (['yes', '2', 'no'], 1)
    """

    def __init__(self, answers: Sequence[str], counts: Sequence[int] | None = None):
        self.answers: list[str] = list(answers)
        self.counts: list[int] | None = [int(c) for c in counts] if counts is not None else None
        if self.counts is not None and len(self.counts) != len(self.answers):
            raise VlkitError(f"answer vocabulary: {len(self.counts)} counts for {len(self.answers)} answers")
        self._index: dict[str, int] = {}
        for i, answer in enumerate(self.answers):
            key = normalize_answer(answer)
            if key in self._index:
                raise VlkitError(f"answer vocabulary: {answer!r} (index {i}) normalises to {key!r}, as "
                                 f"{self.answers[self._index[key]]!r} (index {self._index[key]}) does")
            self._index[key] = i

    @classmethod
    def build(cls, answer_lists: Iterable[Iterable[str | None]], min_count: int = 1,
              max_size: int | None = None) -> AnswerVocab:
        """A vocabulary of the answers given at least ``min_count`` times, the ``max_size`` most frequent.

        Args:
            answer_lists: the human answers of each training question. ``None`` answers and answers that
                normalise to the empty string are ignored.
            min_count: least number of times (over all human answers) an answer must occur.
            max_size: keep at most this many answers (the most frequent); ``None`` keeps all.

        Returns:
            The vocabulary, ordered by count (descending), then alphabetically.

        Raises:
            VlkitError: ``min_count`` < 1 or ``max_size`` < 1.
        """
        if min_count < 1:
            raise VlkitError(f"answer vocabulary: min_count must be at least 1, got {min_count}")
        if max_size is not None and max_size < 1:
            raise VlkitError(f"answer vocabulary: max_size must be at least 1 (or None), got {max_size}")
        counts: Counter[str] = Counter()
        for answers in answer_lists:
            if isinstance(answers, str):
                raise VlkitError("answer vocabulary: expected one list of answers per question, got a string")
            counts.update(a for a in (normalize_answer(x) for x in answers if x is not None) if a)
        ranked = sorted(((a, c) for a, c in counts.items() if c >= min_count), key=lambda ac: (-ac[1], ac[0]))
        ranked = ranked[:max_size] if max_size is not None else ranked
        return cls([a for a, _ in ranked], [c for _, c in ranked])

    def __len__(self) -> int:
        return len(self.answers)

    def __iter__(self) -> Iterator[str]:
        return iter(self.answers)

    def __contains__(self, answer: object) -> bool:
        return isinstance(answer, str) and normalize_answer(answer) in self._index

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AnswerVocab) and (self.answers, self.counts) == (other.answers, other.counts)

    def __repr__(self) -> str:
        head = ", ".join(repr(a) for a in self.answers[:5])
        return f"AnswerVocab({len(self)} answers: {head}{', ...' if len(self) > 5 else ''})"

    def get_index(self, answer: str) -> int | None:
        """Index of ``answer`` (compared in normal form), or ``None`` when it is not in the vocabulary."""
        return self._index.get(normalize_answer(answer))

    def index(self, answer: str) -> int:
        """Index of ``answer`` (compared in normal form).

        Raises:
            KeyError: the answer is not in the vocabulary.
        """
        i = self.get_index(answer)
        if i is None:
            raise KeyError(f"answer {answer!r} (normalised {normalize_answer(answer)!r}) is not in the vocabulary")
        return i

    def targets(self, answers: Sequence[str | None]) -> Tensor:
        """The soft target vector of a question: ``min(humans who gave the answer / 3, 1)`` at its index.

        Args:
            answers: the human answers of the question.

        Returns:
            ``[len(vocab)]`` float32 tensor; zero where no human gave the answer (all zero when none of the
            answers is in the vocabulary).
        """
        out = torch.zeros(len(self), dtype=torch.float32)  # [answers]
        for i, score in soft_targets(answers, self):
            out[i] = score
        return out

    def majority(self) -> str:
        """The most common training answer (the first one on equal counts; without counts, the first answer).

        Raises:
            VlkitError: the vocabulary is empty.
        """
        if not self.answers:
            raise VlkitError("answer vocabulary is empty: no majority answer")
        if self.counts is None:
            return self.answers[0]
        return self.answers[max(range(len(self)), key=lambda i: (self.counts[i], -i))]

    def to_json(self) -> str:
        """The vocabulary as a JSON string (answers in index order, and counts when known)."""
        return json.dumps({"format": _FORMAT, "answers": self.answers, "counts": self.counts}, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> AnswerVocab:
        """The vocabulary saved by :meth:`to_json`.

        Raises:
            VlkitError: the text is not a saved answer vocabulary.
        """
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise VlkitError(f"answer vocabulary: not JSON ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise VlkitError(f"answer vocabulary: not a saved vocabulary (expected format {_FORMAT!r})")
        answers, counts = data.get("answers"), data.get("counts")
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise VlkitError("answer vocabulary: 'answers' must be a list of strings")
        if counts is not None and (not isinstance(counts, list) or not all(isinstance(c, int) for c in counts)):
            raise VlkitError("answer vocabulary: 'counts' must be a list of integers or null")
        return cls(answers, counts)


#: the answer VizWiz gives to a question the image cannot answer (an ordinary answer of the vocabulary)
UNANSWERABLE = "unanswerable"


def ocr_targets(answers: Sequence[str | None], tokens: Sequence[str], slots: int) -> Tensor:
    """The soft targets of a pointer over OCR tokens: ``min(humans who gave the token / 3, 1)`` at each slot
    whose token (normalised as answers are) equals a human answer.

    Every slot holding a matching token gets the target (a word read twice is the answer at both places), as
    M4C's copy targets do; slots beyond the tokens stay 0.

    Args:
        answers: the human answers of the question.
        tokens: the question's OCR tokens, in slot order (only the first ``slots`` are used).
        slots: the pointer's number of slots.

    Returns:
        ``[slots]`` float32 tensor.
    """
    counts = Counter(normalize_answer(a) for a in answers if a is not None)
    counts.pop("", None)
    out = torch.zeros(slots, dtype=torch.float32)  # [slots]
    for k, token in enumerate(list(tokens)[:slots]):
        count = counts.get(normalize_answer(token), 0)
        if count:
            out[k] = min(count / 3, 1.0)
    return out
