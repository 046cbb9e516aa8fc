"""Caption metrics: BLEU, ROUGE-L and CIDEr-D against closed forms and a slow reference, METEOR and the
whole set against published numbers, the PTB tokenizer and its Python approximation, and the error paths."""

from __future__ import annotations

import csv
import json
import math
import stat
from collections import Counter

import pytest

from tests.conftest import COCO, FLICKR
from vlkit.errors import VlkitError
from vlkit.metrics import captioning
from vlkit.metrics.caption_tokenize import java_path, ptb_tokenize, simple_tokenize
from vlkit.metrics.captioning import caption_metrics, coco_results_json

needs_java = pytest.mark.skipif(java_path() is None, reason="no java on PATH")

# Already lowercase and free of punctuation, so tokenisation leaves them as they are.
PREDICTIONS = ["the cat sat on the mat", "a dog runs", "a man rides a red bike down the hill"]
REFERENCES = [
    ["the cat is on the mat", "there is a cat on the mat"],
    ["a dog runs on the grass", "the dog is running"],
    ["a man rides a bike down a hill", "a person riding a red bike down the hill", "a cyclist on a road"],
]


def ngrams(words: list[str], k: int) -> Counter:
    return Counter(tuple(words[i:i + k]) for i in range(len(words) - k + 1))


def reference_bleu(cands: list[str], refs: list[list[str]], n: int) -> float:
    """Corpus BLEU-n from its definition: clipped n-gram precisions summed over the corpus, closest reference
    length (the shorter on a tie), brevity penalty exp(1 - r/c) when c < r, geometric mean of p_1..p_n."""
    correct, total, c_len, r_len = [0] * n, [0] * n, 0, 0
    for cand, rs in zip(cands, refs):
        words, ref_words = cand.split(), [r.split() for r in rs]
        c_len += len(words)
        r_len += min((abs(len(r) - len(words)), len(r)) for r in ref_words)[1]
        for k in range(1, n + 1):
            cand_counts = ngrams(words, k)
            max_ref = Counter()
            for r in ref_words:
                max_ref |= ngrams(r, k)
            correct[k - 1] += sum(min(c, max_ref[g]) for g, c in cand_counts.items())
            total[k - 1] += max(0, len(words) - k + 1)
    precision = math.prod(correct[k] / total[k] for k in range(n)) ** (1 / n)
    return precision * (1.0 if c_len >= r_len else math.exp(1 - r_len / c_len))


def lcs(a: list[str], b: list[str]) -> int:
    """Longest common subsequence by memoised recursion."""
    memo: dict[tuple[int, int], int] = {}

    def go(i: int, j: int) -> int:
        if i == len(a) or j == len(b):
            return 0
        if (i, j) not in memo:
            memo[i, j] = go(i + 1, j + 1) + 1 if a[i] == b[j] else max(go(i + 1, j), go(i, j + 1))
        return memo[i, j]

    return go(0, 0)


def reference_rouge_l(cands: list[str], refs: list[list[str]], beta: float = 1.2) -> float:
    """Mean ROUGE-L: F_beta of the best LCS precision and the best LCS recall over the references."""
    scores = []
    for cand, rs in zip(cands, refs):
        c = cand.split()
        p = max(lcs(c, r.split()) / len(c) for r in rs)
        r = max(lcs(c, r.split()) / len(r.split()) for r in rs)
        scores.append(0.0 if p == 0 or r == 0 else (1 + beta**2) * p * r / (r + beta**2 * p))
    return sum(scores) / len(scores)


def reference_cider_d(cands: list[str], refs: list[list[str]], sigma: float = 6.0) -> list[float]:
    """CIDEr-D of each candidate, from the definition the COCO evaluation implements.

    For n = 1..4: each sentence is a vector of n-gram counts times idf(g) = log(#images) - log(max(1, df(g))),
    df(g) = the number of images whose references contain g. The similarity with one reference is the dot
    product with the candidate's weights clipped by the reference's, over the product of the (unclipped)
    norms, times exp(-(len(c) - len(r))^2 / (2 sigma^2)). The score is 10 x the mean over n and references.
    """
    num_images = len(cands)
    df = Counter(g for rs in refs for g in {g for r in rs for k in range(1, 5) for g in ngrams(r.split(), k)})

    def vector(words: list[str], k: int) -> dict[tuple, float]:
        return {g: c * (math.log(num_images) - math.log(max(1.0, df[g]))) for g, c in ngrams(words, k).items()}

    scores = []
    for cand, rs in zip(cands, refs):
        c_words, total = cand.split(), 0.0
        for r in rs:
            r_words = r.split()
            penalty = math.exp(-((len(c_words) - len(r_words)) ** 2) / (2 * sigma**2))
            for k in range(1, 5):
                vc, vr = vector(c_words, k), vector(r_words, k)
                norm_c = math.sqrt(sum(v * v for v in vc.values()))
                norm_r = math.sqrt(sum(v * v for v in vr.values()))
                dot = sum(min(v, vr.get(g, 0.0)) * vr.get(g, 0.0) for g, v in vc.items())
                total += (dot / (norm_c * norm_r) if norm_c and norm_r else dot) * penalty / 4
        scores.append(10 * total / len(rs))
    return scores


def test_bleu_and_rouge_by_hand_on_one_caption():
    # Clipped precisions 5/6, 3/5, 1/4 (no 4-gram matches); closest reference 6 words = candidate: no penalty.
    # LCS with the first reference is "the cat on the mat": precision = recall = 5/6, so F = 5/6.
    m = caption_metrics(PREDICTIONS[:1], REFERENCES[:1], meteor=False)
    assert m.bleu1 == pytest.approx(100 * 5 / 6, rel=1e-7)
    assert m.bleu2 == pytest.approx(100 * math.sqrt(5 / 6 * 3 / 5), rel=1e-7)
    assert m.bleu3 == pytest.approx(50.0, rel=1e-7)
    # No 4-gram matches: the reference code floors the count at 1e-15 (0/3 -> 1e-15/3), hence not exactly 0.
    assert m.bleu4 == pytest.approx(100 * (5 / 6 * 3 / 5 * 1 / 4 * 1e-15 / 3) ** (1 / 4), rel=1e-6)
    assert m.rouge_l == pytest.approx(100 * 5 / 6, rel=1e-7)


def test_bleu_and_rouge_against_the_definition_on_a_corpus():
    m = caption_metrics(PREDICTIONS, REFERENCES, meteor=False)
    # Corpus sums: candidate 6 + 3 + 9 words, closest references 6 + 4 + 8 -> brevity penalty exp(1 - 18/18) = 1.
    for n in range(1, 5):
        assert getattr(m, f"bleu{n}") == pytest.approx(100 * reference_bleu(PREDICTIONS, REFERENCES, n), rel=1e-6)
    assert m.rouge_l == pytest.approx(100 * reference_rouge_l(PREDICTIONS, REFERENCES), rel=1e-9)
    # The two short captions alone: c = 9 < r = 10, so the brevity penalty exp(1 - 10/9) applies.
    short = caption_metrics(PREDICTIONS[:2], REFERENCES[:2], meteor=False)
    p1, p2, p3 = (5 + 3) / (6 + 3), (3 + 2) / (5 + 2), (1 + 1) / (4 + 1)
    assert short.bleu3 == pytest.approx(100 * math.exp(1 - 10 / 9) * (p1 * p2 * p3) ** (1 / 3), rel=1e-7)
    # Sentence BLEU-4 of the third caption (it has 4-gram matches) agrees with the definition too.
    assert m.bleu4_per_caption[2] == pytest.approx(100 * reference_bleu(PREDICTIONS[2:], REFERENCES[2:], 4), rel=1e-6)


def test_cider_d_against_a_slow_reference():
    m = caption_metrics(PREDICTIONS, REFERENCES, meteor=False)
    expected = reference_cider_d(PREDICTIONS, REFERENCES)
    assert m.cider_per_caption == pytest.approx([100 * s for s in expected], rel=1e-9)
    assert m.cider == pytest.approx(100 * sum(expected) / len(expected), rel=1e-9)
    assert m.cider > 0


@pytest.mark.skipif(not (COCO / "captions.json").is_file(), reason="COCO CC-BY captions not found")
def test_cider_d_and_bleu_on_real_captions():
    """76 COCO images: each image's first caption scored against its other four (already tokenised)."""
    data = json.loads((COCO / "captions.json").read_text())
    by_image: dict[int, list[str]] = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(simple_tokenize(a["caption"]))
    cands = [caps[0] for caps in by_image.values()]
    refs = [caps[1:] for caps in by_image.values()]
    m = caption_metrics(cands, refs, meteor=False)
    assert m.cider_per_caption == pytest.approx([100 * s for s in reference_cider_d(cands, refs)], rel=1e-9)
    assert m.bleu4 == pytest.approx(100 * reference_bleu(cands, refs, 4), rel=1e-6)
    assert m.rouge_l == pytest.approx(100 * reference_rouge_l(cands, refs), rel=1e-9)


def test_identical_captions_score_full_marks():
    refs = [["a dog runs across the grass"], ["two children play in the sand by the sea"]]
    m = caption_metrics([r[0] for r in refs], refs, meteor=False)
    assert (m.bleu1, m.bleu4, m.rouge_l) == pytest.approx((100.0, 100.0, 100.0), rel=1e-7)


@needs_java
def test_published_example_all_metrics(capfd):
    """nlg-eval's README example (the same pycocoevalcap scorers): Bleu_1..4 0.550000 0.428174 0.284043
    0.201143, METEOR 0.295797, ROUGE_L 0.522104, CIDEr 1.242192; and its one-sentence test case."""
    hyps = ["this is the model generated sentence1 which seems good enough",
            "this is sentence2 which has been generated by your model"]
    refs = [["this is one reference sentence for sentence1", "this is one more reference sentence for sentence1"],
            ["this is a reference sentence for sentence2 which was generated by your model",
             "this is the second reference sentence for sentence2"]]
    m = caption_metrics(hyps, refs)
    got = [m.bleu1, m.bleu2, m.bleu3, m.bleu4, m.meteor, m.rouge_l, m.cider]
    assert got == pytest.approx([55.0, 42.8174, 28.4043, 20.1143, 29.5797, 52.2104, 124.2192], abs=1e-4)
    assert m.tokenizer == "ptb" and m.note == ""
    single = caption_metrics(["this is a good test"], [["this is a test", "this is also a test"]], meteor=False)
    assert [single.bleu1, single.bleu2, single.bleu3, single.rouge_l, single.cider] == pytest.approx(
        [80.0, 63.2455, 51.0873, 90.7063, 0.0], abs=1e-4)
    out, err = capfd.readouterr()  # scorers and Java processes stay quiet
    assert out == "" and err == ""


# The PTB tokens of these captions (Stanford PTBTokenizer 3.4.1, -lowerCase, COCO punctuation dropped).
PTB_CASES = [
    ("A dog's toy, \"red\" (big).", "a dog 's toy red -lrb- big -rrb-"),
    ("", ""),
    ("Don't run... Le test est en français.", "do n't run le test est en français"),
    ("The man ran. The cat sat on Mr. Smith's t-shirt -- e.g. 2.5 feet?",
     "the man ran the cat sat on mr. smith 's t-shirt e.g. 2.5 feet"),
    ("I'm here. You're, they've we'll he'd cannot gonna 5:30 $5 100% a/b a&b [x] {y} ok! ?!",
     "i 'm here you 're they 've we 'll he 'd can not gon na 5:30 $ 5 100 % a/b a & b -lsb- x -rsb- -lcb- y -rcb- "
     "ok ?!"),
    ("Three people on ATV 's outside .\nA man\tsmiles", "three people on atv 's outside a man smiles"),
]


@pytest.mark.parametrize("text, tokens", PTB_CASES)
def test_simple_tokenizer_gives_the_ptb_tokens(text, tokens):
    assert simple_tokenize(text) == tokens


@needs_java
def test_ptb_tokenizer_and_its_approximation_agree():
    texts = [t for t, _ in PTB_CASES]
    assert ptb_tokenize(texts) == [tokens for _, tokens in PTB_CASES]
    if FLICKR.exists():
        captions = [r["caption"] for r in csv.DictReader(open(FLICKR / "captions.txt", newline=""))]
        assert ptb_tokenize(captions) == [simple_tokenize(c) for c in captions]


@pytest.mark.parametrize("predictions, references, message", [
    ([], [], "no predictions"),
    (["a dog"], [["a dog"], ["a cat"]], "1 predictions but 2 reference lists"),
    (["a dog", "a cat"], [["a dog"], []], "image 1 has no reference"),
    (["a dog"], [["  "]], "image 0 has no reference"),
    (["a dog"], ["a dog"], r"references\[0\] must be a list"),
    ("a dog", [["a dog"]], "predictions must be a list"),
    ([None], [["a dog"]], "prediction 0 is a NoneType"),
])
def test_bad_input_is_one_clear_error(predictions, references, message):
    with pytest.raises(VlkitError, match=message):
        caption_metrics(predictions, references, meteor=False)


def test_without_java(monkeypatch):
    monkeypatch.setattr(captioning, "java_path", lambda: None)
    with pytest.raises(VlkitError, match="METEOR needs Java.*meteor=False"):
        caption_metrics(["a dog"], [["a dog runs"]])
    with pytest.raises(VlkitError, match="PTB tokenizer needs Java"):
        caption_metrics(["a dog"], [["a dog runs"]], meteor=False, tokenizer="ptb")
    m = caption_metrics(PREDICTIONS, REFERENCES, meteor=False, spice=True)
    assert m.tokenizer == "simple" and m.meteor is None and m.spice is None
    assert "Python approximation" in m.note and "SPICE omitted" in m.note
    keys = ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider")
    assert set(m.as_dict("test/x/")) == {f"test/x/{k}" for k in keys}
    assert m.bleu1 == pytest.approx(100 * reference_bleu(PREDICTIONS, REFERENCES, 1), rel=1e-6)


def test_a_failing_java_process_is_one_error(monkeypatch, tmp_path):
    fake = tmp_path / "java"
    fake.write_text("#!/bin/sh\necho 'starting' >&2\necho 'Error: could not reserve the heap' >&2\nexit 3\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(captioning, "java_path", lambda: str(fake))
    with pytest.raises(VlkitError, match=r"PTB tokenizer \(Java\) failed \(exit code 3\): starting \| Error: could"):
        caption_metrics(["a dog"], [["a dog runs"]], meteor=False)
    with pytest.raises(VlkitError, match=r"METEOR \(Java\) failed \(exit code 3\).*could not reserve the heap"):
        caption_metrics(["a dog"], [["a dog runs"]], tokenizer="simple")


def test_spice_when_its_models_are_absent(monkeypatch, tmp_path):
    monkeypatch.setattr(captioning, "pycocoevalcap_jar", lambda *a: tmp_path / "spice-1.0.jar")
    m = caption_metrics(PREDICTIONS, REFERENCES, meteor=False, spice=True)
    assert m.spice is None and "SPICE omitted: stanford-corenlp-3.6.0.jar" in m.note
    assert "spice" not in m.as_dict()


def test_best_and_worst_by_cider():
    m = caption_metrics(PREDICTIONS, REFERENCES, meteor=False)
    best, worst = m.best_and_worst(2)
    order = sorted(range(3), key=lambda i: -m.cider_per_caption[i])
    assert best == order[:2] and worst == order[::-1][:2]


def test_coco_results_json():
    import numpy as np

    out = coco_results_json([np.int64(42), 7], ["a dog", "a cat"])
    assert out == [{"image_id": 42, "caption": "a dog"}, {"image_id": 7, "caption": "a cat"}]
    assert type(out[0]["image_id"]) is int and json.loads(json.dumps(out)) == out
    with pytest.raises(VlkitError, match="2 image ids but 1 captions"):
        coco_results_json([1, 2], ["a dog"])
    with pytest.raises(VlkitError, match="appears twice"):
        coco_results_json([1, 1], ["a dog", "a cat"])
