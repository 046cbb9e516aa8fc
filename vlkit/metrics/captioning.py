"""Caption metrics as the COCO caption evaluation computes them: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, SPICE.

:func:`caption_metrics` scores one predicted caption per image against that image's human references with the
reference implementations of ``pycocoevalcap`` (the code behind the COCO caption leaderboard):

1. every caption is tokenised with the Stanford PTB tokenizer, lowercased, punctuation dropped
   (:func:`~vlkit.metrics.caption_tokenize.ptb_tokenize`);
2. BLEU-1..4 (``Bleu``: corpus-level modified n-gram precisions, brevity penalty against the closest
   reference length), ROUGE-L (``Rouge``: LCS F-measure with beta 1.2 against the best reference) and CIDEr-D
   (``Cider``: TF-IDF weighted 1-4-gram cosine, candidate counts clipped by the reference counts, Gaussian
   length penalty with sigma 6, times 10; document frequencies come from the references of the scored corpus,
   so a corpus of one image scores 0) run in Python;
3. METEOR 1.5 (``-l en -norm``) and SPICE 1.0 run the jars shipped with pycocoevalcap, as separate Java
   processes fed through pipes and private temporary files.

Corpus scores are reported times 100, as papers do (CIDEr 0.857 -> 85.7). Nothing is printed: the scorers'
prints are captured and the Java processes' stderr is read back, so a failed process becomes one
:class:`~vlkit.errors.VlkitError` that quotes it.

Java is needed for the PTB tokenizer, METEOR and SPICE. Without Java, ``meteor=True`` (the default) is an error
that says so; with ``meteor=False`` the captions are tokenised by vlkit's Python approximation of the PTB
tokenizer instead (identical tokens on all 5380 Flickr8k-1k and COCO captions it was checked on) and the
result's :attr:`CaptionMetrics.note` says so. SPICE also needs the Stanford CoreNLP 3.6.0 jars, which
pycocoevalcap downloads on first use; vlkit never downloads at run time, so when they are absent SPICE is
left out and the note says why.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlkit.errors import VlkitError
from vlkit.metrics.caption_tokenize import (java_failure, java_path, ptb_tokenize, pycocoevalcap_jar,
                                            simple_tokenize)

TOKENIZERS = ("auto", "ptb", "simple")
JAVA_TIMEOUT_S = 1800.0
_INSTALL_JAVA = "install a Java runtime (e.g. apt-get install default-jre-headless)"


@dataclass
class CaptionMetrics:
    """Scores of a set of predicted captions, each against its image's references.

    Attributes:
        bleu1: corpus BLEU-1, times 100.
        bleu2: corpus BLEU-2, times 100.
        bleu3: corpus BLEU-3, times 100.
        bleu4: corpus BLEU-4, times 100.
        meteor: METEOR times 100, or None when not computed.
        rouge_l: mean ROUGE-L times 100.
        cider: mean CIDEr-D times 100.
        spice: mean SPICE F-score times 100, or None when not computed.
        cider_per_caption: CIDEr-D of each prediction (times 100), in input order.
        bleu4_per_caption: sentence BLEU-4 of each prediction (times 100; brevity penalty per sentence).
        num_images: number of predictions scored.
        tokenizer: ``"ptb"`` (the official Stanford tokenizer) or ``"simple"`` (vlkit's approximation).
        note: what was left out or approximated, and why; empty when nothing was.
    """

    bleu1: float
    bleu2: float
    bleu3: float
    bleu4: float
    meteor: float | None
    rouge_l: float
    cider: float
    spice: float | None = None
    cider_per_caption: list[float] = field(default_factory=list)
    bleu4_per_caption: list[float] = field(default_factory=list)
    num_images: int = 0
    tokenizer: str = "ptb"
    note: str = ""

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """The corpus scores as a flat dict, each key prefixed with ``prefix`` (e.g. ``"test/coco/"``).

        Keys: ``bleu1`` .. ``bleu4``, ``meteor``, ``rouge_l``, ``cider`` and ``spice``; a metric that was not
        computed (None) is left out.
        """
        names = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider", "spice")
        return {f"{prefix}{k}": getattr(self, k) for k in names if getattr(self, k) is not None}

    def best_and_worst(self, k: int = 5) -> tuple[list[int], list[int]]:
        """Indices of the ``k`` best and the ``k`` worst predictions by CIDEr-D (ties: the lower index first).

        Returns:
            ``(best, worst)``: best in descending order of CIDEr-D, worst in ascending order.
        """
        order = sorted(range(len(self.cider_per_caption)), key=lambda i: (-self.cider_per_caption[i], i))
        worst = sorted(range(len(self.cider_per_caption)), key=lambda i: (self.cider_per_caption[i], i))
        return order[:k], worst[:k]


def _check_inputs(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> list[list[str]]:
    """Validate the inputs; return each image's references with blank ones left out."""
    if isinstance(predictions, str) or not isinstance(predictions, Sequence):
        raise VlkitError("caption metrics: predictions must be a list of strings")
    if isinstance(references, str) or not isinstance(references, Sequence):
        raise VlkitError("caption metrics: references must be a list of lists of strings (one list per prediction)")
    if not predictions:
        raise VlkitError("caption metrics: no predictions to score")
    if len(predictions) != len(references):
        raise VlkitError(f"caption metrics: {len(predictions)} predictions but {len(references)} reference lists; "
                         "give one list of references per prediction")
    kept = []
    for i, (pred, refs) in enumerate(zip(predictions, references)):
        if not isinstance(pred, str):
            raise VlkitError(f"caption metrics: prediction {i} is a {type(pred).__name__}, not a string")
        if isinstance(refs, str) or not isinstance(refs, Sequence):
            raise VlkitError(f"caption metrics: references[{i}] must be a list of strings, "
                             f"got a {type(refs).__name__}")
        if not all(isinstance(r, str) for r in refs):
            raise VlkitError(f"caption metrics: references[{i}] holds something that is not a string")
        refs = [r for r in refs if r.strip()]
        if not refs:
            raise VlkitError(f"caption metrics: image {i} has no reference caption; "
                             "every prediction needs at least one")
        kept.append(refs)
    return kept


class _Meteor:
    """METEOR 1.5 (pycocoevalcap's jar, ``-l en -norm``) as one Java process spoken to over pipes."""

    def __init__(self, java: str):
        jar = pycocoevalcap_jar("pycocoevalcap.meteor.meteor", "METEOR_JAR", "METEOR")
        self._stderr = tempfile.TemporaryFile()
        cmd = [java, "-jar", "-Xmx2G", jar.name, "-", "-", "-stdio", "-l", "en", "-norm"]
        try:
            self._proc = subprocess.Popen(cmd, cwd=jar.parent, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=self._stderr)
        except OSError as exc:
            self._stderr.close()
            raise VlkitError(f"METEOR could not start {java}: {exc.strerror or exc}") from None
        self._timer = threading.Timer(JAVA_TIMEOUT_S, self._proc.kill)
        self._timer.daemon = True
        self._timer.start()

    def _failure(self) -> VlkitError:
        self._proc.kill()
        code = self._proc.wait()
        self._stderr.seek(0)
        stderr = self._stderr.read().decode("utf-8", errors="replace")
        if not self._timer.is_alive() and not stderr.strip():
            stderr = f"no answer within {JAVA_TIMEOUT_S:g} s"
        return java_failure("METEOR", code, stderr)

    def _send(self, line: str) -> None:
        try:
            self._proc.stdin.write((line + "\n").encode("utf-8"))
            self._proc.stdin.flush()
        except OSError:
            raise self._failure() from None

    def _receive(self) -> str:
        answer = self._proc.stdout.readline()
        if not answer:
            raise self._failure()
        return answer.decode("utf-8", errors="replace").strip()

    def _number(self) -> float:
        answer = self._receive()
        try:
            return float(answer)
        except ValueError:
            raise VlkitError(f"METEOR (Java) answered {answer[:100]!r} where a score was expected") from None

    def score(self, hypotheses: list[str], references: list[list[str]]) -> tuple[float, list[float]]:
        """Corpus METEOR and the score of each hypothesis, both in [0, 1]."""
        stats = []
        for hyp, refs in zip(hypotheses, references):
            hyp = hyp.replace("|||", "").replace("  ", " ")
            self._send(" ||| ".join(("SCORE", *(r.replace("|||", "") for r in refs), hyp)))
            stats.append(self._receive())
        self._send(" ||| ".join(("EVAL", *stats)))
        per_caption = [self._number() for _ in hypotheses]
        return self._number(), per_caption

    def close(self) -> None:
        self._timer.cancel()
        with contextlib.suppress(OSError):
            self._proc.stdin.close()
        self._proc.kill()
        self._proc.wait()
        self._proc.stdout.close()
        self._stderr.close()


def _meteor(java: str, hypotheses: list[str], references: list[list[str]]) -> float:
    scorer = _Meteor(java)
    try:
        return scorer.score(hypotheses, references)[0]
    finally:
        scorer.close()


def _spice_missing() -> tuple[Path, str]:
    """SPICE's jar folder, and what it lacks to run offline ('' when nothing)."""
    spice_dir = pycocoevalcap_jar("pycocoevalcap.spice.spice", "SPICE_JAR", "SPICE").parent
    corenlp = [spice_dir / "lib" / f"stanford-corenlp-3.6.0{suffix}.jar" for suffix in ("", "-models")]
    absent = [p.name for p in corenlp if not p.is_file()]
    if absent:
        return spice_dir, (f"SPICE omitted: {' and '.join(absent)} not in {spice_dir / 'lib'} (pycocoevalcap's "
                           "get_stanford_models downloads them; vlkit never downloads at run time)")
    return spice_dir, ""


def _spice(java: str, spice_dir: Path, hypotheses: list[str], references: list[list[str]]) -> float:
    """Mean SPICE F-score in [0, 1] (NaN for an image propagates, as in pycocoevalcap)."""
    items = [{"image_id": i, "test": h, "refs": r} for i, (h, r) in enumerate(zip(hypotheses, references))]
    with tempfile.TemporaryDirectory(prefix="vlkit-spice-") as tmp:
        source, target = Path(tmp) / "input.json", Path(tmp) / "output.json"
        source.write_text(json.dumps(items), encoding="utf-8")
        cmd = [java, "-jar", "-Xmx8G", "spice-1.0.jar", str(source), "-out", str(target), "-subset", "-silent"]
        try:
            done = subprocess.run(cmd, cwd=spice_dir, capture_output=True, timeout=JAVA_TIMEOUT_S,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise VlkitError(f"SPICE (Java) did not finish within {JAVA_TIMEOUT_S:g} s") from None
        if done.returncode != 0 or not target.is_file():
            raise java_failure("SPICE", done.returncode, done.stderr.decode("utf-8", errors="replace"))
        results = json.loads(target.read_text(encoding="utf-8"))

    def f_score(item: dict[str, Any]) -> float:
        try:
            return float(item["scores"]["All"]["f"])
        except (KeyError, TypeError, ValueError):
            return math.nan

    return sum(f_score(item) for item in results) / len(results)


def _tokenize(texts: list[str], tokenizer: str, java: str | None) -> tuple[list[str], str, str]:
    """Tokens of each text, the tokenizer used, and a note when it was the approximation."""
    if tokenizer == "ptb" or (tokenizer == "auto" and java is not None):
        return ptb_tokenize(texts, java), "ptb", ""
    why = "Java not found" if java is None else "asked for"
    note = f"tokens from vlkit's Python approximation of the PTB tokenizer ({why}); scores may differ slightly"
    return [simple_tokenize(t) for t in texts], "simple", note


def caption_metrics(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    meteor: bool = True,
    spice: bool = False,
    tokenizer: str = "auto",
) -> CaptionMetrics:
    """Score predicted captions against their references with the COCO caption evaluation's metrics.

    Args:
        predictions: one predicted caption per image.
        references: for each prediction, the list of its image's human captions (blank ones are ignored).
        meteor: compute METEOR (needs Java; a few seconds to start).
        spice: compute SPICE when its Stanford CoreNLP jars are installed; otherwise it is left out and
            :attr:`CaptionMetrics.note` says why.
        tokenizer: ``"ptb"`` (the Stanford PTB tokenizer, needs Java), ``"simple"`` (vlkit's Python
            approximation) or ``"auto"`` (PTB when Java is found, else the approximation).

    Returns:
        The corpus scores (times 100), per-caption CIDEr-D and BLEU-4, and a note on anything left out.

    Raises:
        VlkitError: empty input, lengths that differ, an image without references, an unknown tokenizer,
            Java missing where it is needed, pycocoevalcap missing, or a Java process that failed.

    Example:
        >>> m = caption_metrics(["a dog runs on grass"], [["a dog running on the grass", "a brown dog runs"]])
        >>> log(m.as_dict("test/flickr/"))    # {"test/flickr/bleu1": ..., "test/flickr/cider": 0.0, ...}
    """
    if tokenizer not in TOKENIZERS:
        raise VlkitError(f"caption metrics: unknown tokenizer {tokenizer!r}; choose one of {', '.join(TOKENIZERS)}")
    refs = _check_inputs(predictions, references)
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError:
        raise VlkitError("caption metrics need the package pycocoevalcap: pip install pycocoevalcap") from None
    java = java_path()
    if java is None and (meteor or tokenizer == "ptb"):
        needs = "METEOR" if meteor else "the PTB tokenizer"
        fix = "or pass meteor=False to score the other metrics with vlkit's Python tokenizer" if meteor else ""
        raise VlkitError(f"caption metrics: {needs} needs Java, and there is no `java` on PATH: "
                         f"{_INSTALL_JAVA} {fix}".rstrip())
    notes = []
    spice_dir = None
    if spice:
        if java is None:
            notes.append("SPICE omitted: it needs Java, and there is no `java` on PATH")
        else:
            spice_dir, missing = _spice_missing()
            if missing:
                notes.append(missing)
                spice_dir = None

    sizes = [len(r) for r in refs]
    tokens, used, tokenizer_note = _tokenize([*predictions, *(r for rs in refs for r in rs)], tokenizer, java)
    notes.append(tokenizer_note)
    hyps, flat = tokens[:len(predictions)], tokens[len(predictions):]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    ref_tokens = [flat[s:s + n] for s, n in zip(starts, sizes)]
    res = {i: [h] for i, h in enumerate(hyps)}
    gts = dict(enumerate(ref_tokens))

    with contextlib.redirect_stdout(io.StringIO()):  # the scorers print their statistics
        bleu, bleu_each = Bleu(4).compute_score(gts, res)
        rouge, _ = Rouge().compute_score(gts, res)
        cider, cider_each = Cider().compute_score(gts, res)
    meteor_score = _meteor(java, hyps, ref_tokens) if meteor else None
    spice_score = _spice(java, spice_dir, hyps, ref_tokens) if spice_dir is not None else None

    return CaptionMetrics(
        bleu1=100 * bleu[0], bleu2=100 * bleu[1], bleu3=100 * bleu[2], bleu4=100 * bleu[3],
        meteor=None if meteor_score is None else 100 * meteor_score,
        rouge_l=100 * float(rouge), cider=100 * float(cider),
        spice=None if spice_score is None else 100 * spice_score,
        cider_per_caption=[100 * float(s) for s in cider_each],
        bleu4_per_caption=[100 * float(s) for s in bleu_each[3]],
        num_images=len(predictions), tokenizer=used, note="; ".join(n for n in notes if n))


def coco_results_json(ids: Sequence[Any], predictions: Sequence[str]) -> list[dict[str, Any]]:
    """Predictions in the COCO caption results format, ready for ``json.dump``.

    Args:
        ids: the image id of each prediction (COCO ids are integers; numpy and torch integers are converted).
        predictions: one caption per id.

    Returns:
        ``[{"image_id": id, "caption": caption}, ...]`` in input order.

    Raises:
        VlkitError: lengths that differ, a repeated id, or a caption that is not a string.

    Example:
        >>> coco_results_json([42, 73], ["a dog on grass", "two people on a bench"])
        [{'image_id': 42, 'caption': 'a dog on grass'}, {'image_id': 73, 'caption': 'two people on a bench'}]
    """
    if len(ids) != len(predictions):
        raise VlkitError(f"COCO results: {len(ids)} image ids but {len(predictions)} captions")
    out, seen = [], set()
    for image_id, caption in zip(ids, predictions):
        if hasattr(image_id, "item"):  # numpy / torch scalars
            image_id = image_id.item()
        if image_id in seen:
            raise VlkitError(f"COCO results: image id {image_id!r} appears twice; give one caption per image")
        if not isinstance(caption, str):
            raise VlkitError(f"COCO results: the caption of image {image_id!r} is a {type(caption).__name__}")
        seen.add(image_id)
        out.append({"image_id": image_id, "caption": caption})
    return out
