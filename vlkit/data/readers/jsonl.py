"""JSONL, one object per image: ``{"image": path, "text": str or [str], ...extra fields}``.

Known keys: ``image`` (required; ``video`` names a video file in its place), ``text``/``caption``/``captions``, ``id``, ``label`` (kept as given),
``class_name``, ``questions`` with ``answers`` (one list of answers per question), ``split``. Other keys
become extra columns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from vlkit.data.records import Problem, Record

from .common import bad_text, confinement_root, image_id, images_root_for, json_lines

TEXT_KEYS = ("text", "caption", "captions")
MAX_LABEL = 1_000_000  # labels index the class list kept in the dataset's metadata
KNOWN = {"image", "video", "id", "label", "class_name", "questions", "answers", "split", *TEXT_KEYS}


def _texts(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _parse(obj: Any) -> tuple[dict | None, str | None]:
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, found {type(obj).__name__}"
    if "image" not in obj and "video" in obj:  # a video row: read as an image row whose file is a video
        obj = {"image": obj["video"], **{k: v for k, v in obj.items() if k != "video"}}
    if not isinstance(obj.get("image"), str) or not obj["image"]:
        return None, "missing 'image' path"
    return obj, None


def read_jsonl(path: Path, images_root: Path | None, problems: list[Problem]) -> Iterator[Record]:
    for line_no, obj in json_lines(path, problems):
        obj, reason = _parse(obj)
        if reason:
            problems.append(Problem(str(path), line_no, reason))
            continue
        rec = _record(obj, path, line_no, images_root, problems)
        if rec is not None:
            yield rec


def _record(
    obj: dict, path: Path, line_no: int, images_root: Path | None, problems: list[Problem]
) -> Record | None:
    base = images_root_for(path, images_root, obj["image"])
    image_path = base / obj["image"]
    captions = []
    for key in TEXT_KEYS:
        for text in _texts(obj.get(key)):
            reason = bad_text(text)
            if reason:
                problems.append(Problem(str(path), line_no, f"{key}: {reason}"))
                return None
            captions.append(text.strip())
    questions = _texts(obj.get("questions"))
    answers = obj.get("answers") or []
    if len(answers) != len(questions):
        problems.append(
            Problem(str(path), line_no, f"{len(questions)} questions but {len(answers)} answer lists")
        )
        return None
    answers = [[str(a) for a in _texts(ans)] for ans in answers]
    label = obj.get("label")
    if label is not None and (not isinstance(label, int) or isinstance(label, bool)):
        problems.append(Problem(str(path), line_no, f"label must be an integer, found {label!r}"))
        return None
    if label is not None and not 0 <= label <= MAX_LABEL:
        problems.append(Problem(str(path), line_no, f"label must be between 0 and {MAX_LABEL}, found {label}"))
        return None
    class_name = obj.get("class_name")
    if class_name is not None and (not isinstance(class_name, str) or not class_name.strip()):
        problems.append(Problem(str(path), line_no, f"class_name must be a non-empty string, found {class_name!r}"))
        return None
    return Record(
        id=str(obj["id"]) if obj.get("id") is not None else image_id(image_path, base),
        image_path=image_path,
        source=f"{path}:{line_no}",
        captions=captions,
        label=label,
        class_name=class_name,
        questions=[str(q) for q in questions],
        answers=answers,
        split=obj.get("split"),
        extra={k: v for k, v in obj.items() if k not in KNOWN},
        root=confinement_root(path, images_root),
    )
