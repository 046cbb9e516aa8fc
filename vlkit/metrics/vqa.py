"""VQA accuracy: the standard answer normalisation, soft accuracy against human answers, soft training targets.

Normalisation (:func:`normalize_answer`) follows the rules of the official VQA evaluation script, in its order:

1. tabs and newlines become spaces; surrounding whitespace is stripped; the text is lowercased;
2. punctuation: each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is *removed* when that character stands
   next to a space somewhere in the text, or when the text holds a comma between two digits (so
   ``"10,000"`` becomes ``"10000"``); otherwise it is *replaced by a space* (``"black/white"`` becomes
   ``"black white"``). Apostrophes and colons are kept;
3. periods: every period not followed by a digit is removed (``"dog."`` -> ``"dog"``, ``"2.5"`` kept, but also
   ``"5."`` -> ``"5"``; this is what the official pattern does, whatever it was meant to do);
4. word by word: number words ``none``, ``zero`` .. ``ten`` become digits (``none`` -> ``0`` as in the official
   table), the articles ``a``, ``an``, ``the`` are dropped, and apostrophe-less contractions are fixed
   (``dont`` -> ``don't``, ``whats`` -> ``what's``, ``im`` -> ``i'm``); words are joined by single spaces.

Accuracy (:func:`vqa_accuracy`) with ``n`` human answers of which ``m`` equal the prediction (both normalised)
is the mean, over the ``n`` ways of leaving one human answer out, of ``min(matches among the other n - 1 / 3, 1)``:

    acc = (m * min((m - 1) / 3, 1) + (n - m) * min(m / 3, 1)) / n

With the usual 10 answers this gives 0, 0.3, 0.6, 0.9 and 1.0 for 0, 1, 2, 3 and 4+ matching humans. With a
single human answer (nothing would be left) the accuracy is 1.0 on an exact match, else 0.0.

Deviations from the official script, all deliberate:

* the official script normalises nothing (beyond stripping) when all human answers of a question are identical,
  so a prediction ``"Yes"`` scores 0 against ten ``"yes"``; here prediction and answers are always normalised;
* its contraction table has a few capitalised keys (``Im``, ``Ive``, ``Id've``, ``I'dve``) that can never match
  lowercased text; here they are lowercased, so ``im`` -> ``i'm`` does apply;
* its period pattern is applied with a cap of 32 replacements (a misplaced ``re.UNICODE``); here there is no cap;
* accuracies are not rounded to two decimals.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from vlkit.errors import VlkitError

_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_ARTICLES = frozenset({"a", "an", "the"})
_NUMBER_WORDS = {word: str(i) for i, word in enumerate(
    "zero one two three four five six seven eight nine ten".split())}
_NUMBER_WORDS["none"] = "0"

# Contraction fixes of the official evaluation, lowercased: "written as" -> "normalised to", one pair a line.
# (``somebody'd -> somebodyd`` goes the other way round in the official table too; kept for identical scores.)
_CONTRACTION_PAIRS = """
aint ain't | arent aren't | cant can't | couldve could've | couldnt couldn't | couldn'tve couldn't've
couldnt've couldn't've | didnt didn't | doesnt doesn't | dont don't | hadnt hadn't | hadnt've hadn't've
hadn'tve hadn't've | hasnt hasn't | havent haven't | hed he'd | hed've he'd've | he'dve he'd've | hes he's
howd how'd | howll how'll | hows how's | id've i'd've | i'dve i'd've | im i'm | ive i've | isnt isn't
itd it'd | itd've it'd've | it'dve it'd've | itll it'll | maam ma'am | mightnt mightn't
mightnt've mightn't've | mightn'tve mightn't've | mightve might've | mustnt mustn't | mustve must've
neednt needn't | notve not've | oclock o'clock | oughtnt oughtn't | ow's'at 'ow's'at | 'ows'at 'ow's'at
'ow'sat 'ow's'at | shant shan't | shed've she'd've | she'dve she'd've | shouldve should've
shouldnt shouldn't | shouldnt've shouldn't've | shouldn'tve shouldn't've | somebody'd somebodyd
somebodyd've somebody'd've | somebody'dve somebody'd've | somebodyll somebody'll | somebodys somebody's
someoned someone'd | someoned've someone'd've | someone'dve someone'd've | someonell someone'll
someones someone's | somethingd something'd | somethingd've something'd've | something'dve something'd've
somethingll something'll | thats that's | thered there'd | thered've there'd've | there'dve there'd've
therere there're | theres there's | theyd they'd | theyd've they'd've | they'dve they'd've | theyll they'll
theyre they're | theyve they've | twas 'twas | wasnt wasn't | wed've we'd've | we'dve we'd've | weve we've
werent weren't | whatll what'll | whatre what're | whats what's | whatve what've | whens when's
whered where'd | wheres where's | whereve where've | whod who'd | whod've who'd've | who'dve who'd've
wholl who'll | whos who's | whove who've | whyll why'll | whyre why're | whys why's | wont won't
wouldve would've | wouldnt wouldn't | wouldnt've wouldn't've | wouldn'tve wouldn't've | yall y'all
yall'll y'all'll | y'allll y'all'll | yall'd've y'all'd've | y'alld've y'all'd've | y'all'dve y'all'd've
youd you'd | youd've you'd've | you'dve you'd've | youll you'll | youre you're | youve you've
"""
CONTRACTIONS: dict[str, str] = dict(
    pair.split() for line in _CONTRACTION_PAIRS.strip().splitlines() for pair in line.split("|"))


def _strip_punctuation(text: str) -> str:
    """Step 2 of the normalisation: remove or space out the listed punctuation (decided on the input text)."""
    remove_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in _PUNCTUATION:
        if p not in out:
            continue
        beside_space = (p + " ") in text or (" " + p) in text
        out = out.replace(p, "" if remove_all or beside_space else " ")
    return out


def normalize_answer(text: str) -> str:
    """An answer in the normal form of the VQA evaluation (see the module docstring for the rules).

    Args:
        text: a predicted or human answer.

    Returns:
        The normalised answer: lowercase words separated by single spaces (possibly empty).

    Raises:
        TypeError: ``text`` is not a string.

    Example:
        >>> normalize_answer("Two dogs.")
        '2 dogs'
        >>> normalize_answer("dont know")
        "don't know"
    """
    if not isinstance(text, str):
        raise TypeError(f"normalize_answer: expected a string, got {type(text).__name__}")
    text = text.replace("\n", " ").replace("\t", " ").strip().lower()
    text = _PERIOD_NOT_BEFORE_DIGIT.sub("", _strip_punctuation(text))
    words = []
    for word in text.split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def _normalized(answers: Sequence[str | None]) -> list[str]:
    """The normalised human answers, ``None`` entries left out."""
    if isinstance(answers, str):
        raise TypeError("expected a list of human answers, got a single string")
    return [normalize_answer(a) for a in answers if a is not None]


def vqa_accuracy(prediction: str, answers: Sequence[str | None]) -> float:
    """Soft VQA accuracy of one predicted answer against the human answers of its question.

    The mean over the leave-one-out subsets of the human answers of ``min(#matches / 3, 1)``, as the official
    evaluation computes it (10 answers: 0, 0.3, 0.6, 0.9, 1.0 for 0, 1, 2, 3, 4+ matching humans). Any number
    of answers uses the same averaging; a single answer scores 1.0 on a match, else 0.0. Prediction and
    answers are normalised with :func:`normalize_answer` first; ``None`` answers are ignored.

    Args:
        prediction: the predicted answer.
        answers: the human answers of the question (usually 10, repeats included).

    Returns:
        The accuracy in ``[0, 1]``.

    Raises:
        VlkitError: there is no human answer.
    """
    truth = _normalized(answers)
    if not truth:
        raise VlkitError("vqa_accuracy: the question has no human answers to compare with")
    n, m = len(truth), truth.count(normalize_answer(prediction))
    if n == 1:
        return float(m)
    # m subsets leave out a matching answer (m - 1 matches remain), n - m leave out another one (m remain)
    return (m * min((m - 1) / 3, 1.0) + (n - m) * min(m / 3, 1.0)) / n


@dataclass
class VQAMetrics:
    """VQA accuracy over a set of questions.

    Attributes:
        accuracy: mean soft accuracy in percent (0-100) over the scored questions; 0.0 when none was scored.
        count: number of questions scored.
        skipped: number of questions left out because they have no human answer.
        per_question_type: accuracy in percent per question type, when types were given.
        per_answer_type: accuracy in percent per answer type (e.g. ``yes/no``, ``number``), when given.
        answerable_accuracy: accuracy in percent over the scored questions marked answerable (VizWiz), when
            answerability was given and such questions were scored; else None.
        unanswerable_accuracy: the same over the questions marked unanswerable.
        answerable_count: scored questions marked answerable.
        unanswerable_count: scored questions marked unanswerable.
    """

    accuracy: float
    count: int
    skipped: int = 0
    per_question_type: dict[str, float] = field(default_factory=dict)
    per_answer_type: dict[str, float] = field(default_factory=dict)
    answerable_accuracy: float | None = None
    unanswerable_accuracy: float | None = None
    answerable_count: int = 0
    unanswerable_count: int = 0

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """The metrics as a flat dict with keys prefixed by ``prefix`` (e.g. ``"val/vqav2/"``).

        Keys: ``accuracy``, ``count``, ``question_type/<type>`` and ``answer_type/<type>`` for each type,
        ``answerable_accuracy`` and ``unanswerable_accuracy`` (with their counts) when known.
        """
        out = {f"{prefix}accuracy": float(self.accuracy), f"{prefix}count": float(self.count)}
        for name in ("answerable", "unanswerable"):
            value = getattr(self, f"{name}_accuracy")
            if value is not None:
                out[f"{prefix}{name}_accuracy"] = float(value)
                out[f"{prefix}{name}_count"] = float(getattr(self, f"{name}_count"))
        out.update({f"{prefix}question_type/{k}": v for k, v in self.per_question_type.items()})
        out.update({f"{prefix}answer_type/{k}": v for k, v in self.per_answer_type.items()})
        return out


def _check_types(name: str, types: Sequence[Any] | None, n: int) -> None:
    if types is not None and len(types) != n:
        raise VlkitError(f"vqa_metrics: {name} has {len(types)} entries for {n} predictions")


def _per_type(types: Sequence[Any] | None, scores: dict[int, float]) -> dict[str, float]:
    """Accuracy in percent per type over the scored questions; questions whose type is ``None`` are left out."""
    if types is None:
        return {}
    groups: dict[str, list[float]] = {}
    for i, score in scores.items():
        if types[i] is not None:
            groups.setdefault(str(types[i]), []).append(score)
    return {t: 100.0 * sum(v) / len(v) for t, v in sorted(groups.items())}


def _mean_percent(scores: list[float]) -> float | None:
    return 100.0 * sum(scores) / len(scores) if scores else None


def vqa_metrics(predictions: Sequence[str], answers_list: Sequence[Sequence[str | None]],
                question_types: Sequence[str | None] | None = None,
                answer_types: Sequence[str | None] | None = None,
                answerable: Sequence[bool | None] | None = None) -> VQAMetrics:
    """VQA accuracy of predicted answers, overall, per question / answer type, and on answerable and
    unanswerable questions apart.

    Questions without any human answer cannot be scored: they are left out and counted in ``skipped``.

    Args:
        predictions: one predicted answer per question.
        answers_list: the human answers of each question.
        question_types: optional type of each question (e.g. ``"what color"``) for a per-type breakdown.
        answer_types: optional answer type of each question (e.g. ``"yes/no"``) for a per-type breakdown.
        answerable: optional answerability of each question (VizWiz's ``answerable``; ``None``: unknown, left
            out of both groups) for the accuracy on answerable and on unanswerable questions.

    Returns:
        The :class:`VQAMetrics`.

    Raises:
        VlkitError: the sequences differ in length.

    Example:
        >>> vqa_metrics(["yes", "2"], [["yes"] * 10, ["two"] * 2 + ["3"] * 8]).accuracy
        80.0
    """
    n = len(predictions)
    if len(answers_list) != n:
        raise VlkitError(f"vqa_metrics: {n} predictions but {len(answers_list)} answer lists")
    _check_types("question_types", question_types, n)
    _check_types("answer_types", answer_types, n)
    _check_types("answerable", answerable, n)
    scores = {i: vqa_accuracy(p, a) for i, (p, a) in enumerate(zip(predictions, answers_list))
              if any(x is not None for x in a)}
    accuracy = 100.0 * sum(scores.values()) / len(scores) if scores else 0.0
    groups: dict[bool, list[float]] = {True: [], False: []}
    if answerable is not None:
        for i, score in scores.items():
            if answerable[i] is not None:
                groups[bool(answerable[i])].append(score)
    return VQAMetrics(accuracy=accuracy, count=len(scores), skipped=n - len(scores),
                      per_question_type=_per_type(question_types, scores),
                      per_answer_type=_per_type(answer_types, scores),
                      answerable_accuracy=_mean_percent(groups[True]),
                      unanswerable_accuracy=_mean_percent(groups[False]),
                      answerable_count=len(groups[True]), unanswerable_count=len(groups[False]))


def soft_targets(answers: Sequence[str | None], vocab: Any) -> list[tuple[int, float]]:
    """The soft training target of a question: ``(vocabulary index, min(count / 3, 1))`` per known answer.

    ``count`` is how many humans gave the (normalised) answer. Answers outside the vocabulary are left out, so
    a question may have no target at all.

    Args:
        answers: the human answers of the question.
        vocab: an :class:`vlkit.data.answers.AnswerVocab`, or a mapping from normalised answer to index.

    Returns:
        ``(index, score)`` pairs in increasing index order.
    """
    lookup = vocab.get if isinstance(vocab, Mapping) else vocab.get_index
    targets = {}
    for answer, count in Counter(_normalized(answers)).items():
        index = lookup(answer)
        if index is not None:
            targets[int(index)] = min(count / 3, 1.0)
    return sorted(targets.items())
