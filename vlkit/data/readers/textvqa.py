"""TextVQA (0.5.1): ``{"dataset_name": "textvqa", "data": [{"image_id", "question", "answers", ...}]}``.

Each entry is one question: ``question``, ``answers`` (the ten human answers, strings), ``image_id`` (the
OpenImages id, the image file's stem, e.g. ``train_images/0054c91397f2fe05.jpg``) and, in files that carry
them (the M4C / Hugging Face layouts), ``ocr_tokens``: the words an OCR system read in the image. The image is
the file named by ``image_path``, ``image_name``, ``file_name`` or ``image`` when the entry has one, else the
file under the images root whose name is ``<image_id>`` with an image suffix (in any subfolder). The URLs
(``flickr_original_url``) are never fetched: images are read from disk.

Questions are grouped per image. The OCR tokens are kept per image in the ``ocr_tokens`` column (a list of
strings; the first question's list when questions of one image disagree).

The official question files (``TextVQA_0.5.1_<split>.json``) carry no OCR tokens: those are in the Rosetta OCR
file of the split (``TextVQA_Rosetta_OCR_v0.2_<split>.json``, ``{"data": [{"image_id", "ocr_tokens",
"ocr_info"}]}``), which this reader also reads (entries without a question give an image its tokens). Ingest
both together and the records of each image are merged into one row::

    vlkit ingest TextVQA_0.5.1_train.json TextVQA_Rosetta_OCR_v0.2_train.json --images-root train_images \\
        --out textvqa.lance
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from vlkit.data.records import Problem, Record
from vlkit.errors import DataError

from .common import IMAGE_SUFFIXES, bad_text, confinement_root, image_id, images_root_for, load_json

NAME_KEYS = ("image_path", "image_name", "file_name", "image")
MAX_OCR_TOKENS = 512  # more words than any real image shows: a bound on what one row may hold


def is_textvqa(data: Any) -> bool:
    """Whether parsed JSON looks like a TextVQA file: a ``data`` list of question entries (or, in the OCR file,
    of ``image_id`` + ``ocr_tokens`` entries)."""
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        return False
    first = next((e for e in data["data"] if isinstance(e, dict)), None)
    return first is not None and ("question" in first or ("ocr_tokens" in first and "image_id" in first))


class _StemFinder:
    """Images under a root by file stem (an index built on first use)."""

    def __init__(self, root: Path):
        self.root = root
        self._by_stem: dict[str, Path] | None = None

    def __call__(self, entry: dict) -> Path | None:
        name = next((entry[k] for k in NAME_KEYS if isinstance(entry.get(k), str) and entry[k]), None)
        if name:
            return self.root / name
        key = entry.get("image_id")
        if not isinstance(key, (str, int)) or isinstance(key, bool) or not str(key):
            return None
        if self._by_stem is None:
            self._by_stem = {}
            for p in sorted(self.root.rglob("*")):
                if p.suffix.lower() in IMAGE_SUFFIXES:
                    self._by_stem.setdefault(p.stem, p)
        return self._by_stem.get(str(key))


def _ocr_tokens(entry: dict) -> tuple[list[str] | None, str | None]:
    """The entry's OCR tokens (None when it has none) or why they are unusable."""
    tokens = entry.get("ocr_tokens")
    if tokens is None:
        return None, None
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        return None, "ocr_tokens must be a list of strings"
    if len(tokens) > MAX_OCR_TOKENS:
        return None, f"{len(tokens)} ocr_tokens (at most {MAX_OCR_TOKENS})"
    if any(bad_text(t) == "undecodable text (not valid UTF-8)" for t in tokens):
        return None, "ocr_tokens: undecodable text (not valid UTF-8)"
    return [t.strip() for t in tokens if t.strip()], None


def read_textvqa(path: Path, images_root: Path | None, problems: list[Problem]) -> Iterator[Record]:
    """Records of a TextVQA file, one per image, with the OCR tokens as the ``ocr_tokens`` column.

    Raises:
        DataError: the file is not a TextVQA file (no ``data`` list of questions).
    """
    data = load_json(path)
    if not is_textvqa(data):
        raise DataError(f"{path}: not a TextVQA file (expected an object with a 'data' list of questions)")
    entries = data["data"]
    first = next((e.get(k) for e in entries if isinstance(e, dict) for k in NAME_KEYS if e.get(k)), None)
    root = images_root_for(path, images_root, first if isinstance(first, str) else None)
    find = _StemFinder(root)
    records: dict[str, Record] = {}
    with_ocr = any(isinstance(e, dict) and e.get("ocr_tokens") is not None for e in entries)
    for i, entry in enumerate(entries):
        where = f"data[{i}]"
        if not isinstance(entry, dict):
            problems.append(Problem(str(path), where, "question entry is not an object"))
            continue
        if "question" not in entry and "ocr_tokens" in entry:  # an entry of the OCR file: tokens only
            _add_tokens(entry, path, where, find, root, images_root, records, problems)
            continue
        reason = bad_text(entry.get("question"))
        if reason:
            problems.append(Problem(str(path), where, f"question: {reason}"))
            continue
        answers = entry.get("answers")
        if not isinstance(answers, list) or not answers or any(bad_text(a) for a in answers):
            problems.append(Problem(str(path), where, "question without a usable answer"))
            continue
        tokens, reason = _ocr_tokens(entry)
        if reason:
            problems.append(Problem(str(path), where, reason))
            continue
        rec = _image_record(entry, path, where, find, root, images_root, records, problems, "this question")
        if rec is None:
            continue
        rec.questions.append(entry["question"].strip())
        rec.answers.append([a.strip() for a in answers])
        if with_ocr and rec.extra.get("ocr_tokens") is None:
            rec.extra["ocr_tokens"] = tokens
    yield from records.values()


def _add_tokens(entry: dict, path: Path, where: str, find: _StemFinder, root: Path, images_root: Path | None,
                records: dict[str, Record], problems: list[Problem]) -> None:
    """An OCR-file entry: the image's record (without questions) with its ``ocr_tokens``."""
    tokens, reason = _ocr_tokens(entry)
    if reason:
        problems.append(Problem(str(path), where, reason))
        return
    rec = _image_record(entry, path, where, find, root, images_root, records, problems, "these OCR tokens")
    if rec is not None and rec.extra.get("ocr_tokens") is None:
        rec.extra["ocr_tokens"] = tokens


def _image_record(entry: dict, path: Path, where: str, find: _StemFinder, root: Path, images_root: Path | None,
                  records: dict[str, Record], problems: list[Problem], what: str) -> Record | None:
    """The record of the image ``entry`` names (made on first sight), or None with a problem naming ``what``
    when no image is found."""
    image_path = find(entry)
    if image_path is None:
        problems.append(Problem(str(path), where, f"no image for {what} ({entry.get('image_id')})"))
        return None
    key = image_id(image_path, root)
    return records.setdefault(key, Record(id=key, image_path=image_path, source=f"{path}:{where}",
                                          root=confinement_root(path, images_root)))
