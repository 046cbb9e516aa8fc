"""NLVR2: one JSON object per line, a sentence about a pair of images and whether it is true of them.

The official files (``train.json``, ``dev.json``, ``test1.json``: JSON lines despite the suffix) have
``identifier`` (``dev-850-0-0``: split, set, pair, sentence), ``sentence``, ``label`` (``"True"``/``"False"``),
``left_url``/``right_url`` and, in ``train``, ``directory``. The released images of a pair are named after the
identifier without its last part: ``dev-850-0-img0.png`` (left) and ``dev-850-0-img1.png`` (right), in the
images root, its ``<split>/`` folder, or (train) its ``<directory>/`` or ``train/<directory>/`` folder.
A line may instead name its images itself with ``left`` and ``right`` (paths relative to the images root).

Each line becomes one row: ``id`` = identifier, the sentence as its caption, ``label`` 1 (``true``) or 0
(``false``), the left image as ``image`` and the right one as ``image2``; the split comes from the
identifier's prefix (``train``, ``dev`` -> ``val``, ``test1``/``test2`` -> ``test``) unless a ``split`` key
gives it. Other keys (``writer``, ``synset``, ``left_url`` ...) become extra columns.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from vlkit.data.records import Problem, Record

from .common import bad_text, confinement_root, images_root_for, json_lines

CLASSES = ("false", "true")
SPLITS = {"train": "train", "dev": "val", "val": "val", "test": "test", "test1": "test", "test2": "test"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
KNOWN = {"identifier", "sentence", "label", "left", "right", "split"}
_LABELS = {"true": 1, "false": 0}
_PEEK_BYTES = 1 << 16  # an NLVR2 line is a few hundred bytes; a longer first line is some other JSON


def is_nlvr2(path: Path) -> bool:
    """Whether the first line of ``path`` is an NLVR2 object (``identifier`` and ``sentence``, no ``image``).

    Reads at most the first 64 KiB, so a large single-line JSON file (COCO) is not parsed here."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(_PEEK_BYTES).lstrip()
        line = raw.split(b"\n", 1)[0]  # cut short by the peek, it does not parse: not NLVR2
        if not line.startswith(b"{"):
            return False
        obj = json.loads(line.decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(obj, dict) and "identifier" in obj and "sentence" in obj and "image" not in obj


def pair_stem(identifier: str) -> str:
    """The file-name stem of a pair's images: the identifier without its last ``-`` part.

    Example:
        >>> pair_stem("dev-850-0-0")
        'dev-850-0'
    """
    return identifier.rsplit("-", 1)[0] if "-" in identifier else identifier


def _label(value: Any) -> int | None:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, str):
        return _LABELS.get(value.strip().lower())
    return None


def find_image(base: Path, identifier: str, side: int, directory: Any = None) -> Path:
    """Where the released image ``side`` (0 left, 1 right) of ``identifier``'s pair lies under ``base``: the
    first of the usual places that exists, else the first place (so that a report names it)."""
    stem, prefix = pair_stem(identifier), identifier.split("-", 1)[0]
    folders = [base, base / prefix, base / "images"]
    if directory is not None and str(directory).strip() and "/" not in str(directory) and ".." not in str(directory):
        folders += [base / str(directory), base / prefix / str(directory)]
    candidates = [folder / f"{stem}-img{side}{suffix}" for folder in folders for suffix in IMAGE_SUFFIXES]
    return next((c for c in candidates if c.is_file()), candidates[0])


def read_nlvr2(path: Path, images_root: Path | None, problems: list[Problem]) -> Iterator[Record]:
    """Records of an NLVR2 file, one per line (see the module docstring); a bad line is reported and skipped."""
    base: Path | None = None
    for line_no, obj in json_lines(path, problems):
        if base is None:
            first = obj.get("left") if isinstance(obj, dict) and isinstance(obj.get("left"), str) else None
            base = images_root_for(path, images_root, first)
        rec, reason = _record(obj, path, line_no, base, images_root)
        if reason:
            problems.append(Problem(str(path), line_no, reason))
        else:
            yield rec


def _record(obj: Any, path: Path, line_no: int, base: Path,
            images_root: Path | None) -> tuple[Record | None, str | None]:
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, found {type(obj).__name__}"
    identifier = obj.get("identifier")
    if not isinstance(identifier, str) or not identifier.strip():
        return None, "missing 'identifier'"
    reason = bad_text(obj.get("sentence"))
    if reason:
        return None, f"sentence: {reason}"
    label = _label(obj.get("label"))
    if label is None:
        return None, f"label must be \"True\" or \"False\", found {obj.get('label')!r}"
    images = []
    for side, key in enumerate(("left", "right")):
        given = obj.get(key)
        if given is not None and (not isinstance(given, str) or not given):
            return None, f"'{key}' must be an image path, found {given!r}"
        images.append(base / given if given else find_image(base, identifier, side, obj.get("directory")))
    if not obj.get("right") and images[0].is_file() and not images[1].is_file():  # reported beside the left one
        images[1] = images[0].parent / f"{pair_stem(identifier)}-img1{images[0].suffix}"
    split = obj.get("split")
    if split is not None and not isinstance(split, str):
        return None, f"split must be a string, found {split!r}"
    return Record(
        id=identifier,
        image_path=images[0],
        image2_path=images[1],
        source=f"{path}:{line_no}",
        captions=[obj["sentence"].strip()],
        label=label,
        class_name=CLASSES[label],
        split=split or SPLITS.get(identifier.split("-", 1)[0]),
        extra={k: v for k, v in obj.items() if k not in KNOWN},
        root=confinement_root(path, images_root),
    ), None
