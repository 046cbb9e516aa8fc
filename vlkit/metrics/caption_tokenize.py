"""Caption tokenisation for the COCO caption metrics: the Stanford PTB tokenizer (Java) and a Python fallback.

The COCO caption evaluation tokenises every caption with the Stanford CoreNLP 3.4.1 ``PTBTokenizer``
(``-preserveLines -lowerCase``, one caption a line) and then drops the punctuation tokens
``'' ' `` ` -LRB- -RRB- -LCB- -RCB- . ? ! , : - -- ... ;``. :func:`ptb_tokenize` runs that same jar (the one
shipped with ``pycocoevalcap``) with the same options and the same punctuation list, so the tokens and the
scores computed from them are the official ones. Two things differ from ``pycocoevalcap``'s own wrapper, neither
of which changes a token of ASCII text:

* the input file lives in a private temporary directory (the wrapper writes into its installed package
  folder, which may be read-only), the tokenizer's chatter on stderr is captured, and a failed Java process
  or a lost line is one :class:`~vlkit.errors.VlkitError`;
* input and output are read as UTF-8 (``-encoding UTF-8``), so non-ASCII words survive whatever the locale.

Because the jar lowercases before the punctuation list is applied, the bracket tokens come out as ``-lrb-``,
``-rrb-``, ... and are *kept* (the list spells them in capitals); both tokenizers here reproduce that.

:func:`simple_tokenize` is a pure-Python approximation of the same pipeline, used only when Java is missing and
METEOR is not asked for. It lowercases, splits off the PTB clitics (``'s 're 've 'll 'd 'm n't``), punctuation,
brackets and symbols, keeps inner hyphens, decimals, times and abbreviations such as ``mr.`` and ``e.g.``, and
drops the same punctuation tokens. On ordinary captions it gives the PTB tokens exactly; rare constructions
(other abbreviations, URLs, emoticons) can differ, which is why results computed with it say so.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from vlkit.errors import VlkitError

# The tokens the COCO evaluation removes after tokenisation (pycocoevalcap's list).
PUNCTUATIONS = frozenset({"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-",
                          "--", "...", ";"})
PTB_TIMEOUT_S = 600.0
_SENTINEL = "vlkitendofcaptions"


def java_path() -> str | None:
    """The ``java`` executable on ``PATH``, or None."""
    return shutil.which("java")


def pycocoevalcap_jar(module: str, attribute: str, what: str) -> Path:
    """A jar shipped with pycocoevalcap: ``attribute`` of ``module`` names it, beside the module's file."""
    try:
        mod = __import__(module, fromlist=[attribute])
    except ImportError:
        raise VlkitError(f"{what} needs the package pycocoevalcap: pip install pycocoevalcap") from None
    path = Path(mod.__file__).resolve().parent / getattr(mod, attribute)
    if not path.is_file():
        raise VlkitError(f"{what}: {path} is missing; reinstall pycocoevalcap")
    return path


def java_failure(what: str, returncode: int | None, stderr: str) -> VlkitError:
    """One-line error for a Java process that failed: what ran, its exit code and its last words on stderr."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    said = " | ".join(lines[-2:])[-300:] if lines else "nothing on stderr"
    code = "" if returncode is None else f" (exit code {returncode})"
    return VlkitError(f"{what} (Java) failed{code}: {said}")


def _one_line(text: str) -> str:
    """Every run of whitespace (line breaks included) as one space: one caption, one input line."""
    return " ".join(text.split())


def ptb_tokenize(texts: Sequence[str], java: str | None = None) -> list[str]:
    """Tokenise captions as the COCO evaluation does: Stanford PTBTokenizer, lowercased, punctuation dropped.

    Args:
        texts: the captions.
        java: the ``java`` executable (default: the one on ``PATH``).

    Returns:
        One string of space-separated tokens per caption (empty for a caption of punctuation only).

    Raises:
        VlkitError: no Java, pycocoevalcap missing, or the tokenizer failed or lost a line.

    Example:
        >>> ptb_tokenize(["A dog's toy, (red)."])
        ["a dog 's toy -lrb- red -rrb-"]
    """
    java = java or java_path()
    if java is None:
        raise VlkitError("the PTB caption tokenizer needs Java (no `java` on PATH): install a Java runtime, "
                         "e.g. apt-get install default-jre-headless")
    jar = pycocoevalcap_jar("pycocoevalcap.tokenizer.ptbtokenizer", "STANFORD_CORENLP_3_4_1_JAR", "the PTB tokenizer")
    lines = [_one_line(t) for t in texts] + [_SENTINEL]
    with tempfile.TemporaryDirectory(prefix="vlkit-ptb-") as tmp:
        source = Path(tmp) / "captions.txt"
        source.write_text("\n".join(lines) + "\n", encoding="utf-8")
        cmd = [java, "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase",
               "-encoding", "UTF-8", str(source)]
        try:
            done = subprocess.run(cmd, capture_output=True, timeout=PTB_TIMEOUT_S, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise VlkitError(f"the PTB tokenizer (Java) did not finish within {PTB_TIMEOUT_S:g} s") from None
        except OSError as exc:
            raise VlkitError(f"the PTB tokenizer could not start {java}: {exc.strerror or exc}") from None
    stderr = done.stderr.decode("utf-8", errors="replace")
    if done.returncode != 0:
        raise java_failure("the PTB tokenizer", done.returncode, stderr)
    out = done.stdout.decode("utf-8", errors="replace").split("\n")
    if len(out) <= len(texts) or out[len(texts)].strip() != _SENTINEL:
        raise VlkitError(f"the PTB tokenizer (Java) returned {len(out) - 1} lines for {len(texts)} captions; "
                         f"stderr: {stderr.strip()[-200:] or 'empty'}")
    return [" ".join(w for w in line.split() if w not in PUNCTUATIONS) for line in out[:len(texts)]]


# --- the Python approximation -----------------------------------------------------------------------------------

_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_ABBREVIATIONS = ("mrs", "mr", "ms", "dr", "st", "jr", "sr", "vs", "etc", "inc", "co", "ltd", "mt", "prof")
_SPLIT_WORDS = {"cannot": "can not", "gonna": "gon na", "gotta": "got ta", "wanna": "wan na"}
# Tokens matched in order at each position; the first alternative that matches wins.
_TOKEN = re.compile(r"""
      (?P<number>\d+(?:[.,:/]\d+)+)                 # 2.5  10,000  5:30  1/2
    | (?P<dotted>(?:[a-z]\.){2,})                  # e.g.  u.s.
    | (?P<abbrev>\b(?:""" + "|".join(_ABBREVIATIONS) + r""")\.)   # mr.  st.
    | (?P<word>\w+(?:[-/.']\w+)*)                  # t-shirt  a/b  o'clock  (clitics split afterwards)
    | (?P<clitic>'(?:s|re|ve|ll|d|m)\b|n't\b)        # a clitic already apart: man 's
    | (?P<marks>[?!]+)                              # ?  !  ?!
    | (?P<other>\.\.\.|--|``|''|\S)                 # ...  --  quotes  brackets  symbols  single characters
""", re.VERBOSE)
_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")


def _split_word(word: str) -> list[str]:
    """Clitics and contracted forms apart: ``don't`` -> ``do n't``, ``dog's`` -> ``dog 's``."""
    if word in _SPLIT_WORDS:
        return _SPLIT_WORDS[word].split()
    match = _CLITIC.match(word)
    if match:
        return [*_split_word(match.group(1)), match.group(2)]
    return [word]


def simple_tokenize(text: str) -> str:
    """Python approximation of :func:`ptb_tokenize` for one caption (see the module docstring for its limits).

    Args:
        text: a caption.

    Returns:
        Its lowercased tokens joined by spaces, the COCO punctuation tokens dropped.

    Example:
        >>> simple_tokenize("Two dogs don't play (outside).")
        "two dogs do n't play -lrb- outside -rrb-"
    """
    tokens: list[str] = []
    for match in _TOKEN.finditer(_one_line(text).lower()):
        kind, token = match.lastgroup, match.group()
        if kind == "word":
            tokens.extend(_split_word(token))
        elif kind == "other":
            tokens.append(_BRACKETS.get(token, "''" if token == '"' else token))
        else:
            tokens.append(token)
    return " ".join(t for t in tokens if t not in PUNCTUATIONS)
