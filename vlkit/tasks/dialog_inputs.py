"""The rounds of a Visual Dialog batch and how a round's candidates go into a fusion model.

A row of a dialog dataset (:mod:`vlkit.data.readers.visdial`) is one image with its caption and, per round, the
question, the answer, the option strings, the index of the answer among them and, where dense annotations
exist, each option's relevance. A round is scored by pairing the image with one text per candidate answer::

    caption [SEP] q1 a1 [SEP] q2 a2 [SEP] question [SEP] candidate

the history holding the last ``history_rounds`` rounds before the question. The text is tokenised as a pair
(context, candidate); when it is too long the context is cut from the left, so the caption and the oldest
history go first and the question and the candidate are kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from vlkit.errors import VlkitError

#: the columns every dialog dataset has
DIALOG_COLUMNS = ["captions", "dialog_questions", "dialog_answers", "dialog_options", "dialog_gt_index"]
#: the column a dialog dataset with dense annotations has, read when present
RELEVANCE_COLUMN = "dialog_relevance"


def dialog_columns(path: Any) -> list[str]:
    """:data:`DIALOG_COLUMNS` and, when the dataset at ``path`` has it, :data:`RELEVANCE_COLUMN`."""
    from vlkit.data.store import open_dataset

    names = open_dataset(path).schema.names
    return list(DIALOG_COLUMNS) + ([RELEVANCE_COLUMN] if RELEVANCE_COLUMN in names else [])


def dialog_texts(ds, offsets: Sequence[int]) -> set[str]:
    """Every question, answer and answer option of the rows ``offsets`` of a Lance dataset (the words a tokenizer
    built from the training texts must know)."""
    table = ds.take(list(offsets), columns=["dialog_questions", "dialog_answers", "dialog_options"])
    texts: set[str] = set()
    for name in ("dialog_questions", "dialog_answers"):
        for values in table.column(name).to_pylist():
            texts.update(v for v in values or [] if v)
    for rounds in table.column("dialog_options").to_pylist():
        for options in rounds or []:
            texts.update(o for o in options or [] if o)
    return texts


@dataclass
class DialogRound:
    """One round to rank.

    Attributes:
        owner: position of its image in the batch.
        index: the row's index in its dataset.
        round: the round's position in its dialog (from 0).
        context: caption, history and question as one text (see the module docstring).
        options: the candidate answers.
        gt_index: the right candidate's position, or None (unknown).
        relevance: each candidate's relevance, or None (no dense annotation).
    """

    owner: int
    index: int
    round: int
    context: str
    options: list[str]
    gt_index: int | None
    relevance: list[float] | None = None


def _separator(tokenizer) -> str:
    """``[SEP]`` where the tokenizer has it, else a full stop."""
    return " [SEP] " if tokenizer is not None and tokenizer.token_id("[SEP]") is not None else " . "


def dialog_context(caption: str, questions: Sequence[str], answers: Sequence[str | None], round_index: int,
                   history_rounds: int, sep: str = " [SEP] ") -> str:
    """Caption, the last ``history_rounds`` rounds before ``round_index`` (question and answer) and the round's
    question, joined by ``sep``."""
    start = max(0, round_index - history_rounds)
    history = [f"{questions[r]} {answers[r] or ''}".strip() for r in range(start, round_index)]
    return sep.join([caption, *history, questions[round_index]]).strip()


def dialog_rounds(batch: dict[str, Any], history_rounds: int, tokenizer=None,
                  pick: Callable[[int, list[int]], int] | None = None) -> list[DialogRound]:
    """The rankable rounds of a batch (rounds with options): all of them (``pick=None``), or for each image one
    round with a known answer, ``pick(row index, such rounds)``.

    Args:
        batch: a batch with the :data:`DIALOG_COLUMNS` (and :data:`RELEVANCE_COLUMN` when present).
        history_rounds: previous rounds kept in each context.
        tokenizer: the model's tokenizer (for its separator token).
        pick: chooses a round of an image (training).
    """
    sep = _separator(tokenizer)
    out: list[DialogRound] = []
    for pos in range(len(batch["dialog_questions"])):
        questions = list(batch["dialog_questions"][pos] or [])
        answers = list(batch["dialog_answers"][pos] or [None] * len(questions))
        options = [list(o or []) for o in (batch["dialog_options"][pos] or [])]
        gts = list(batch["dialog_gt_index"][pos] or [None] * len(questions))
        rel = list(batch[RELEVANCE_COLUMN][pos] or []) if RELEVANCE_COLUMN in batch else []
        captions = batch["captions"][pos] or [""]
        index = int(batch["index"][pos])
        rounds = [r for r in range(min(len(questions), len(options))) if options[r]]
        if pick is not None:
            known = [r for r in rounds if r < len(gts) and gts[r] is not None]
            if not known:
                continue
            rounds = [known[pick(index, known)]]
        for r in rounds:
            relevance = rel[r] if r < len(rel) else None
            out.append(DialogRound(pos, index, r, dialog_context(captions[0], questions, answers, r, history_rounds, sep),
                                   options[r], gts[r] if r < len(gts) else None,
                                   None if relevance is None else [float(v) for v in relevance]))
    return out


class PairEncoder:
    """Tokenises ``(context, candidate)`` pairs, cutting the context from the left when a pair is too long.

    Args:
        tokenizer: a :class:`~vlkit.data.text.TextTokenizer`.
    """

    def __init__(self, tokenizer):
        from tokenizers import Tokenizer

        self.tokenizer = tokenizer
        self._pair = Tokenizer.from_str(tokenizer.tokenizer.to_str())
        self._pair.no_padding()
        self._pair.enable_truncation(max_length=tokenizer.max_length, strategy="only_first", direction="left")

    def __call__(self, contexts: Sequence[str], candidates: Sequence[str]) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` ``[pairs, length]`` (right-padded)."""
        if len(contexts) != len(candidates):
            raise VlkitError(f"{len(contexts)} dialog contexts for {len(candidates)} candidate answers")
        rows = []
        for context, candidate in zip(contexts, candidates):
            try:
                ids = self._pair.encode(context, candidate).ids
            except Exception:  # the candidate alone leaves no room for any context: keep the candidate's start
                ids = self.tokenizer([f"{context} {candidate}"])["input_ids"][0].tolist()
            rows.append(ids[: self.tokenizer.max_length])
        longest = max((len(r) for r in rows), default=0)
        input_ids = torch.full((len(rows), longest), self.tokenizer.pad_id, dtype=torch.int64)  # [P, L]
        attention_mask = torch.zeros((len(rows), longest), dtype=torch.int64)  # [P, L]
        for i, ids in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
            attention_mask[i, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}


def require_matching_logits(model) -> None:
    """Raise unless ``model`` scores image-text pairs with logits (a fusion model with an ITM head)."""
    if not (hasattr(model, "match_features") and hasattr(model, "match_logits") and hasattr(model, "itm_head")):
        raise VlkitError(f"task visdial needs a fusion model with an image-text matching head (albef-*, vilt-*), "
                         f"not {type(model).__name__}")
