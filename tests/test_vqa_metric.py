"""VQA answer normalisation, soft accuracy, metrics, soft targets and the answer vocabulary."""

from __future__ import annotations

import pytest
import torch

from vlkit.data.answers import AnswerVocab
from vlkit.errors import VlkitError
from vlkit.metrics.vqa import normalize_answer, soft_targets, vqa_accuracy, vqa_metrics


@pytest.mark.parametrize("raw, expected", [
    ("Two", "2"),
    ("ten", "10"),
    ("none", "0"),
    ("a dog.", "dog"),
    ("The Cat", "cat"),
    ("an apple", "apple"),
    ("dont know", "don't know"),
    ("isnt", "isn't"),
    ("whats that", "what's that"),
    ("Im here", "i'm here"),
    ("yes!", "yes"),
    ("  Yes \n", "yes"),
    ("yes\tsir", "yes sir"),
    ("2.5", "2.5"),
    ("5.", "5"),                 # the official pattern strips a period unless a digit follows it
    ("10,000", "10000"),         # a digit-comma-digit: all listed punctuation is removed, not spaced
    ("1,000-2,000", "10002000"),
    ("black/white", "black white"),  # no space beside it: punctuation becomes a space
    ("red, white", "red white"),     # a space beside it: punctuation is removed
    ("red,white", "red white"),
    ("(left)", "left"),
    ("t-shirt", "t shirt"),
    ("don't", "don't"),          # apostrophes are not in the punctuation list
    ("12:30", "12:30"),          # nor are colons
    ("", ""),
    ("the", ""),
])
def test_normalize_answer_official_rules(raw, expected):
    assert normalize_answer(raw) == expected


def test_normalize_answer_is_idempotent_and_rejects_non_strings():
    for raw in ["Two dogs.", "10,000", "a-b, c", "dont", "1.5 m.", "what's (up)?", "somebody'd"]:
        once = normalize_answer(raw)
        assert normalize_answer(once) == once
    with pytest.raises(TypeError):
        normalize_answer(None)


def _leave_one_out(prediction: str, answers: list[str]) -> float:
    """Slow reference: the official loop over the leave-one-out subsets."""
    pred, truth = normalize_answer(prediction), [normalize_answer(a) for a in answers]
    accs = [min(1.0, sum(a == pred for j, a in enumerate(truth) if j != i) / 3) for i in range(len(truth))]
    return sum(accs) / len(accs)


def test_vqa_accuracy_ten_answers_by_hand():
    answers = ["2", "two", "3", "3", "3", "3", "4", "4", "4", "many"]
    # "2" matches 2 of 10 humans ("two" normalises to "2"). Leaving out one of the 2 matching answers leaves
    # 1 match -> 1/3 (2 subsets); leaving out one of the other 8 leaves 2 matches -> 2/3 (8 subsets).
    # Mean: (2 * 1/3 + 8 * 2/3) / 10 = (2/3 + 16/3) / 10 = 6 / 10 = 0.6
    assert vqa_accuracy("2", answers) == pytest.approx(0.6)
    assert vqa_accuracy("Two.", answers) == pytest.approx(0.6)
    # "4" matches 3: (3 * 2/3 + 7 * min(3/3, 1)) / 10 = (2 + 7) / 10 = 0.9 -- 3 humans is not yet 1.0
    assert vqa_accuracy("4", answers) == pytest.approx(0.9)
    # "3" matches 4: every subset keeps at least 3 matches -> 1.0
    assert vqa_accuracy("3", answers) == 1.0
    # one match: (1 * 0 + 9 * 1/3) / 10 = 0.3
    assert vqa_accuracy("many", answers) == pytest.approx(0.3)
    assert vqa_accuracy("five", answers) == 0.0


def test_vqa_accuracy_matches_the_slow_loop_for_any_count():
    for n in range(2, 12):
        for m in range(n + 1):
            answers = ["yes"] * m + ["no"] * (n - m)
            assert vqa_accuracy("yes", answers) == pytest.approx(_leave_one_out("yes", answers)), (n, m)
    assert vqa_accuracy("yes", ["yes"] * 10) == 1.0


def test_vqa_accuracy_few_answers():
    assert vqa_accuracy("Yes", ["yes"]) == 1.0  # a single answer: exact match after normalisation
    assert vqa_accuracy("no", ["yes"]) == 0.0
    # two answers, both matching: each subset keeps 1 match -> 1/3
    assert vqa_accuracy("yes", ["yes", "yes"]) == pytest.approx(1 / 3)
    assert vqa_accuracy("yes", ["yes", None, "yes"]) == pytest.approx(1 / 3)  # None is not an answer
    with pytest.raises(VlkitError, match="no human answers"):
        vqa_accuracy("yes", [])


def test_vqa_metrics_overall_and_per_type():
    preds = ["yes", "2", "red", "no"]
    answers = [["yes"] * 10, ["two"] * 2 + ["3"] * 8, ["blue"] * 10, []]
    m = vqa_metrics(preds, answers, question_types=["is the", "how many", "what color", "is the"],
                    answer_types=["yes/no", "number", "other", "yes/no"])
    # scored: 1.0, 0.6, 0.0 (the last has no answers and is skipped)
    assert m.count == 3 and m.skipped == 1
    assert m.accuracy == pytest.approx(100 * 1.6 / 3)
    assert m.per_answer_type == pytest.approx({"number": 60.0, "other": 0.0, "yes/no": 100.0})
    assert m.per_question_type["how many"] == pytest.approx(60.0)
    d = m.as_dict("val/vqa/")
    assert d["val/vqa/accuracy"] == pytest.approx(m.accuracy)
    assert d["val/vqa/count"] == 3.0
    assert d["val/vqa/answer_type/yes/no"] == pytest.approx(100.0)
    assert d["val/vqa/question_type/what color"] == 0.0


def test_vqa_metrics_errors_and_empty():
    with pytest.raises(VlkitError, match="answer lists"):
        vqa_metrics(["yes"], [])
    with pytest.raises(VlkitError, match="question_types"):
        vqa_metrics(["yes"], [["yes"]], question_types=[])
    empty = vqa_metrics([], [])
    assert (empty.accuracy, empty.count, empty.as_dict()) == (0.0, 0, {"accuracy": 0.0, "count": 0.0})


def test_soft_targets_with_a_mapping_and_a_vocab():
    answers = ["yes"] * 7 + ["Yes!", "no", "unknown word"]
    # "yes" 8 times -> 1.0; "no" once -> 1/3; "unknown word" is not in the vocabulary
    assert soft_targets(answers, {"no": 0, "yes": 1}) == [(0, pytest.approx(1 / 3)), (1, 1.0)]
    vocab = AnswerVocab(["yes", "no", "2"])
    assert soft_targets(["two", "2", "no"], vocab) == [(1, pytest.approx(1 / 3)), (2, pytest.approx(2 / 3))]
    assert soft_targets(["maybe"], vocab) == []


def test_vocab_order_counts_and_limits():
    lists = [["yes", "yes", "no"], ["Two", "2", "yes"], ["blue", "red"], ["red", "a dog", "dog."]]
    vocab = AnswerVocab.build(lists)
    # counts: yes 3; 2 2; dog 2; red 2; blue 1; no 1 -> by count, then alphabetical
    assert vocab.answers == ["yes", "2", "dog", "red", "blue", "no"]
    assert vocab.counts == [3, 2, 2, 2, 1, 1]
    assert len(vocab) == 6 and vocab.majority() == "yes"
    assert vocab.index("TWO") == 1 and "The dog" in vocab and "cat" not in vocab
    assert vocab.get_index("cat") is None
    with pytest.raises(KeyError, match="cat"):
        vocab.index("cat")
    assert AnswerVocab.build(lists, min_count=2).answers == ["yes", "2", "dog", "red"]
    assert AnswerVocab.build(lists, max_size=3).answers == ["yes", "2", "dog"]
    assert AnswerVocab.build(list(reversed(lists))).answers == vocab.answers  # order-independent
    with pytest.raises(VlkitError, match="min_count"):
        AnswerVocab.build(lists, min_count=0)


def test_vocab_targets_json_and_errors():
    vocab = AnswerVocab.build([["yes"] * 6 + ["no"] * 4, ["2"] * 3])
    assert vocab.answers == ["yes", "no", "2"]
    t = vocab.targets(["no", "no", "yes", "two", "cat"])
    assert t.dtype == torch.float32 and t.shape == (3,)
    assert torch.allclose(t, torch.tensor([1 / 3, 2 / 3, 1 / 3]))
    assert vocab.targets(["cat"]).sum() == 0
    again = AnswerVocab.from_json(vocab.to_json())
    assert again == vocab and again.majority() == "yes"
    plain = AnswerVocab(["no", "yes"])  # as a model config stores it: no counts, the first is the majority
    assert plain.majority() == "no" and AnswerVocab.from_json(plain.to_json()) == plain
    with pytest.raises(VlkitError, match="normalises"):
        AnswerVocab(["Two", "2"])
    with pytest.raises(VlkitError, match="not a saved vocabulary"):
        AnswerVocab.from_json('{"answers": []}')
    with pytest.raises(VlkitError, match="empty"):
        AnswerVocab([]).majority()
