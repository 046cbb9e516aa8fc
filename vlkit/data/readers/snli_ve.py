"""SNLI-VE visual entailment: the official ``snli_ve_{train,dev,test}.jsonl`` files, one (image, hypothesis,
label) pair per line.

Keys read: ``Flikr30kID`` (sic: the Flickr30k image file name, e.g. ``"3416050480.jpg"``; a bare number gets
``.jpg``), ``sentence2`` (the hypothesis, kept as the row's caption), ``gold_label`` (``entailment``,
``neutral`` or ``contradiction``), ``pairID`` (the row id), ``sentence1`` (the premise caption, not an input of
the task; kept in the ``premise`` column) and an optional ``split``. Each pair becomes one dataset row with its
own image blob, so an image with five hypotheses is stored five times.

The labels are fixed: :data:`LABELS` in that order (0 entailment, 1 neutral, 2 contradiction), whatever the
file holds. The split comes from a ``split`` key, else from the file name (``snli_ve_train`` -> ``train``,
``dev`` -> ``val``, ``test`` -> ``test``), else from a hash of the pair id at ingest.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

from vlkit.data.records import Problem, Record

from .common import bad_text, confinement_root, images_root_for, json_lines

#: the class names by label, in the order every SNLI-VE dataset keeps them
LABELS = ("entailment", "neutral", "contradiction")
#: the keys that tell an SNLI-VE line from other JSONL
SIGNATURE = ("Flikr30kID", "sentence2")
_SPLITS = {"train": "train", "dev": "val", "val": "val", "test": "test"}


def is_snli_ve(path: Path) -> bool:
    """Whether the first JSON object of the JSONL file ``path`` has the SNLI-VE keys (:data:`SIGNATURE`)."""
    try:
        with open(path, "rb") as fh:
            for raw in fh:
                if raw.strip():
                    obj = json.loads(raw.decode("utf-8"))
                    return isinstance(obj, dict) and all(k in obj for k in SIGNATURE)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return False


def split_from_name(path: Path) -> str | None:
    """The split a file's name gives (``snli_ve_dev.jsonl`` -> ``val``), or None."""
    match = re.search(r"(?:^|[_.-])(train|dev|val|test)(?:$|[_.-])", path.stem.lower())
    return _SPLITS[match.group(1)] if match else None


def image_name(value: Any) -> str | None:
    """The image file name of a ``Flikr30kID`` value: as given, with ``.jpg`` added to a bare id."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        return None
    value = value.strip()
    return value if Path(value).suffix else f"{value}.jpg"


def _record(obj: dict, path: Path, line_no: int, images_root: Path | None, split: str | None
            ) -> tuple[Record | None, str | None]:
    name = image_name(obj.get("Flikr30kID"))
    if name is None:
        return None, "Flikr30kID: missing or not an image name"
    reason = bad_text(obj.get("sentence2"))
    if reason:
        return None, f"sentence2: {reason}"
    gold = obj.get("gold_label")
    if gold not in LABELS:
        return None, f"gold_label must be one of {', '.join(LABELS)}, found {gold!r}"
    pair = obj.get("pairID")
    if pair is not None and (not isinstance(pair, (str, int)) or isinstance(pair, bool) or pair == ""):
        return None, f"pairID must be a string or an integer, found {pair!r}"
    given = obj.get("split")
    if given is not None and (not isinstance(given, str) or not given.strip()):
        return None, f"split must be a non-empty string, found {given!r}"
    premise = obj.get("sentence1")
    base = images_root_for(path, images_root, name)
    return Record(
        id=str(pair) if pair is not None else f"{path.name}:{line_no}",
        image_path=base / name,
        source=f"{path}:{line_no}",
        captions=[obj["sentence2"].strip()],
        label=LABELS.index(gold),
        class_name=gold,
        split=given.strip() if given is not None else split,
        extra={"premise": premise.strip()} if isinstance(premise, str) and premise.strip() else {},
        root=confinement_root(path, images_root),
    ), None


def read_snli_ve(path: Path, images_root: Path | None, problems: list[Problem]) -> Iterator[Record]:
    """Records of an SNLI-VE JSONL file, one per (image, hypothesis) pair; bad lines are reported in
    ``problems`` (file, line, reason) and skipped."""
    split = split_from_name(path)
    seen: dict[str, int] = {}
    for line_no, obj in json_lines(path, problems):
        if not isinstance(obj, dict):
            problems.append(Problem(str(path), line_no, f"expected a JSON object, found {type(obj).__name__}"))
            continue
        rec, reason = _record(obj, path, line_no, images_root, split)
        if reason:
            problems.append(Problem(str(path), line_no, reason))
            continue
        if rec.id in seen:
            problems.append(Problem(str(path), line_no, f"pairID {rec.id!r} repeats line {seen[rec.id]}"))
            continue
        seen[rec.id] = line_no
        yield rec
