"""VQA questions: a JSON list of ``{"image" or "file_name" or "image_id", "question", "answer" or "answers"}``,
or the VQA layout ``{"questions": [...], "annotations": [...]}`` joined on ``question_id``.

``answers`` may be a list of strings or of ``{"answer": str}`` objects (the human answers); the images are
found under the images root by file name, or by a COCO ``image_id`` (``*<id:012d>.jpg``).

VizWiz files (a list of ``{"image", "question", "answers", "answerable", "answer_type"}``) keep, per question,
``answerable`` (a boolean, in the ``answerable`` column) and ``answer_type`` (``answer_type`` column), both
lists aligned with the ``questions`` column; a file without them gives no such columns. The same holds for
``question_id`` (the ``question_id`` column, used by ``vlkit predict --format official``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from vlkit.data.records import Problem, Record
from vlkit.errors import DataError

from .common import IMAGE_SUFFIXES, bad_text, confinement_root, image_id, images_root_for, load_json


def _answers(entry: dict) -> list[str]:
    raw: Any = entry.get("answers", entry.get("answer", entry.get("multiple_choice_answer")))
    if raw is None:
        return []
    raw = raw if isinstance(raw, list) else [raw]
    return [str(a["answer"] if isinstance(a, dict) else a).strip() for a in raw]


class _ImageFinder:
    """Resolves a question's image: by file name, or by COCO numeric id through an index of the root."""

    def __init__(self, root: Path):
        self.root = root
        self._by_number: dict[int, Path] | None = None

    def __call__(self, entry: dict) -> Path | None:
        name = entry.get("image") or entry.get("file_name")
        if name:
            return self.root / str(name)
        if "image_id" not in entry:
            return None
        if self._by_number is None:
            self._by_number = {}
            for p in self.root.rglob("*"):
                digits = p.stem.rsplit("_", 1)[-1]
                if p.suffix.lower() in IMAGE_SUFFIXES and digits.isdigit():
                    self._by_number.setdefault(int(digits), p)
        try:
            return self._by_number.get(int(entry["image_id"]))
        except (TypeError, ValueError):
            return None


def _entries(path: Path, data: Any) -> list:
    if isinstance(data, list):
        return data
    if isinstance(data, dict) and isinstance(data.get("questions"), list):
        by_qid = {a.get("question_id"): a for a in data.get("annotations", []) if isinstance(a, dict)}
        merged = []
        for q in data["questions"]:
            if isinstance(q, dict) and q.get("question_id") in by_qid:
                q = {**by_qid[q["question_id"]], **q}
            merged.append(q)
        return merged
    raise DataError(f"{path}: not a VQA file (expected a list of questions or a 'questions' list)")


def _answerable(value: Any) -> bool | None:
    """VizWiz's ``answerable`` (0/1, or a boolean) as a boolean; None when absent or not one of those."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    return None


def read_vqa(path: Path, images_root: Path | None, problems: list[Problem]) -> Iterator[Record]:
    entries = _entries(path, load_json(path))
    per_question = [k for k in ("answerable", "answer_type", "question_id")
                    if any(isinstance(e, dict) and e.get(k) is not None for e in entries)]
    first = next((e.get("image") or e.get("file_name") for e in entries if isinstance(e, dict)), None)
    root = images_root_for(path, images_root, first)
    find = _ImageFinder(root)
    records: dict[str, Record] = {}
    for i, entry in enumerate(entries):
        where = f"[{i}]"
        if not isinstance(entry, dict):
            problems.append(Problem(str(path), where, "question entry is not an object"))
            continue
        reason = bad_text(entry.get("question"))
        if reason:
            problems.append(Problem(str(path), where, f"question: {reason}"))
            continue
        answers = _answers(entry)
        if not answers or any(bad_text(a) for a in answers):
            problems.append(Problem(str(path), where, "question without a usable answer"))
            continue
        image_path = find(entry)
        if image_path is None:
            problems.append(Problem(str(path), where, f"no image for this question ({entry.get('image_id')})"))
            continue
        key = image_id(image_path, root)
        rec = records.setdefault(key, Record(id=key, image_path=image_path, source=f"{path}:{where}",
                                             root=confinement_root(path, images_root)))
        rec.questions.append(entry["question"].strip())
        rec.answers.append(answers)
        if "answerable" in per_question:
            rec.extra.setdefault("answerable", []).append(_answerable(entry.get("answerable")))
        if "question_id" in per_question:
            rec.extra.setdefault("question_id", []).append(entry.get("question_id"))
        if "answer_type" in per_question:
            kind = entry.get("answer_type")
            rec.extra.setdefault("answer_type", []).append(str(kind) if kind is not None else None)
    yield from records.values()
