"""Visual Dialog (VisDial v1.0): ``{"version", "split", "data": {"questions", "answers", "dialogs"}}``.

``questions`` and ``answers`` are tables of strings; each dialog is ``{"image_id", "caption", "dialog": [round,
...]}`` and each round ``{"question": qi, "answer": ai, "answer_options": [indices into answers], "gt_index": k}``
(the test split's last round has options but no answer nor ``gt_index``; its earlier rounds have no options).
The image is the file under the images root whose name ends with the id as a number
(``VisualDialog_val2018_000000000042.jpg``, ``COCO_train2014_000000000042.jpg``, ``42.png``), in any subfolder.

Dense annotations (``visdial_1.0_val_dense_annotations.json``: a list of ``{"image_id", "round_id",
"gt_relevance"}``, ``round_id`` counted from 1, ``relevance`` in the training sample) are read from the file
beside the dialogs named ``<stem>_dense_annotations.json`` when it exists.

One row per image, self-contained (the option strings are stored, not indices into the file's tables):
``captions`` holds the caption and per round, in order, the columns :data:`DIALOG_COLUMNS` hold the question,
the answer (null where unknown), the option strings, the index of the answer among them (null where unknown)
and, where dense annotations exist, the relevance of each option (null for rounds without). The file's
``split`` (``train``, ``val``, ``test``) becomes the rows' split.

A dialog with anything wrong (an index out of its table, a ``gt_index`` outside the options or pointing at
another answer than the round's, no image) is skipped whole, with one problem line naming it
(``file:data.dialogs[i] (image_id N)``); a dense annotation that does not fit its round (not one score per
option, no such round) is one problem line naming its entry, and left out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from vlkit.data.records import Problem, Record
from vlkit.errors import DataError

from .common import bad_text, confinement_root, image_id, images_root_for, load_json
from .vqa import _ImageFinder

#: the per-round columns a dialog row has (``dialog_relevance`` only with dense annotations)
DIALOG_COLUMNS = ("dialog_questions", "dialog_answers", "dialog_options", "dialog_gt_index", "dialog_relevance")
DENSE_SUFFIX = "_dense_annotations.json"
MAX_ROUNDS = 100  # VisDial has 10; a bound on what one row may hold
MAX_OPTIONS = 1000  # VisDial has 100


def is_visdial(data: Any) -> bool:
    """Whether parsed JSON looks like a VisDial file: a ``data`` object with ``dialogs``."""
    return isinstance(data, dict) and isinstance(data.get("data"), dict) and "dialogs" in data["data"]


def _split(value: Any) -> str | None:
    """The vlkit split of VisDial's ``split`` (``train``, ``val2018`` ...), or None."""
    if not isinstance(value, str):
        return None
    for name in ("train", "val", "test"):
        if value.lower().startswith(name):
            return name
    return None


def _index(value: Any, table: list, what: str) -> tuple[Any, str | None]:
    """``table[value]`` or why ``value`` is no index of it."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(table):
        return None, f"{what} {value!r} is not an index of the {len(table)} entries of its table"
    return table[value], None


def _round(entry: Any, questions: list, answers: list, number: int) -> tuple[dict | None, str | None]:
    """One round as stored (question, answer, options, gt_index) or why it is unusable."""
    where = f"round {number}"
    if not isinstance(entry, dict):
        return None, f"{where} is not an object"
    question, reason = _index(entry.get("question"), questions, "question")
    if reason:
        return None, f"{where}: {reason}"
    answer = None
    if entry.get("answer") is not None:
        answer, reason = _index(entry["answer"], answers, "answer")
        if reason:
            return None, f"{where}: {reason}"
    raw = entry.get("answer_options")
    options: list[str] = []
    if raw is not None:
        if not isinstance(raw, list) or not raw or len(raw) > MAX_OPTIONS:
            return None, f"{where}: answer_options must be a list of 1 to {MAX_OPTIONS} answer indices"
        for k, value in enumerate(raw):
            text, reason = _index(value, answers, f"answer_options[{k}]")
            if reason:
                return None, f"{where}: {reason}"
            options.append(text)
    gt = entry.get("gt_index")
    if gt is not None:
        if isinstance(gt, bool) or not isinstance(gt, int) or not 0 <= gt < len(options):
            return None, f"{where}: gt_index {gt!r} is outside its {len(options)} answer options"
        if answer is not None and options[gt] != answer:
            return None, f"{where}: gt_index {gt} points at option {options[gt]!r}, not the answer {answer!r}"
    for text in [question, answer, *options]:
        if text is not None and bad_text(text) == "undecodable text (not valid UTF-8)":
            return None, f"{where}: undecodable text (not valid UTF-8)"
    return {"question": question.strip(), "answer": None if answer is None else answer.strip(),
            "options": [o.strip() for o in options], "gt_index": gt}, None


def _dense(path: Path, problems: list[Problem]) -> dict[tuple[int, int], tuple[int, list[float]]]:
    """The dense annotations beside ``path``, by ``(image_id, round index from 0)``: ``(entry index, relevance)``;
    bad entries are problems."""
    dense_path = path.with_name(path.stem + DENSE_SUFFIX)
    if not dense_path.is_file():
        return {}
    data = load_json(dense_path)
    if not isinstance(data, list):
        raise DataError(f"{dense_path}: not VisDial dense annotations (expected a list of "
                        "{image_id, round_id, gt_relevance})")
    out: dict[tuple[int, int], tuple[int, list[float]]] = {}
    for i, entry in enumerate(data):
        relevance = entry.get("gt_relevance", entry.get("relevance")) if isinstance(entry, dict) else None
        image, round_id = (entry.get("image_id"), entry.get("round_id")) if isinstance(entry, dict) else (None, None)
        if (not isinstance(relevance, list) or not relevance
                or not all(isinstance(r, (int, float)) and not isinstance(r, bool) and r >= 0 for r in relevance)):
            problems.append(Problem(str(dense_path), f"[{i}]", "gt_relevance must be a list of numbers >= 0"))
        elif not isinstance(image, int) or not isinstance(round_id, int) or round_id < 1:
            problems.append(Problem(str(dense_path), f"[{i}]", "needs an integer image_id and a round_id from 1"))
        else:
            out[(image, round_id - 1)] = (i, [float(r) for r in relevance])
    return out


def read_visdial(path: Path, images_root: Path | None, problems: list[Problem]) -> Iterator[Record]:
    """Records of a VisDial file, one per dialog (see the module docstring).

    Raises:
        DataError: the file is not a VisDial file, or its dense annotations file is not a list.
    """
    data = load_json(path)
    if not is_visdial(data):
        raise DataError(f"{path}: not a VisDial file (expected 'data' with 'questions', 'answers', 'dialogs')")
    body = data["data"]
    questions, answers, dialogs = body.get("questions"), body.get("answers"), body.get("dialogs")
    for name, value in (("questions", questions), ("answers", answers), ("dialogs", dialogs)):
        if not isinstance(value, list):
            raise DataError(f"{path}: data.{name} must be a list")
    for name, table in (("questions", questions), ("answers", answers)):
        bad = next((i for i, t in enumerate(table) if not isinstance(t, str)), None)
        if bad is not None:
            raise DataError(f"{path}: data.{name}[{bad}] is not a string")
    dense = _dense(path, problems)
    split = _split(data.get("split"))
    root = images_root_for(path, images_root, None)
    find = _ImageFinder(root)
    dense_path = path.with_name(path.stem + DENSE_SUFFIX)
    records: dict[str, Record] = {}
    rounds_of: dict[Any, int] = {}  # rounds of every dialog of the file, skipped or not
    for i, dialog in enumerate(dialogs):
        number = dialog.get("image_id") if isinstance(dialog, dict) else None
        where = f"data.dialogs[{i}]" + (f" (image_id {number})" if number is not None else "")
        if isinstance(dialog, dict) and isinstance(dialog.get("dialog"), list):
            rounds_of[number] = len(dialog["dialog"])
        row, reason = _dialog_row(dialog, questions, answers)
        if reason is None:
            image_path = find({"image_id": number})
            reason = f"no image for this dialog (image_id {number!r})" if image_path is None else None
        if reason is None:
            key = image_id(image_path, root)
            reason = "a second dialog of the same image" if key in records else None
        if reason is not None:
            problems.append(Problem(str(path), where, reason))
            continue
        if dense:
            row["dialog_relevance"] = _relevance(number, row["dialog_options"], dense, dense_path, problems)
        caption = row.pop("caption")
        records[key] = Record(id=key, image_path=image_path, source=f"{path}:{where}", captions=[caption],
                              split=split, extra=row, root=confinement_root(path, images_root))
    for (image, round_index), (k, _) in sorted(dense.items(), key=lambda item: item[1][0]):
        if round_index >= rounds_of.get(image, 0):
            problems.append(Problem(str(dense_path), f"[{k}]", f"image_id {image} round_id {round_index + 1}: no "
                                    "such dialog round in the file"))
    yield from records.values()


def _relevance(number: int, options: list[list[str]], dense: dict[tuple[int, int], tuple[int, list[float]]],
               dense_path: Path, problems: list[Problem]) -> list[list[float] | None]:
    """Per round of dialog ``number``, its dense relevance or None; an annotation whose length is not the
    round's number of options is a problem and left out."""
    out: list[list[float] | None] = []
    for r, round_options in enumerate(options):
        k, scores = dense.get((number, r), (None, None))
        if scores is not None and len(scores) != len(round_options):
            problems.append(Problem(str(dense_path), f"[{k}]", f"image_id {number} round_id {r + 1}: {len(scores)} "
                                    f"relevance scores for {len(round_options)} answer options; left out"))
            scores = None
        out.append(scores)
    return out


def _dialog_row(dialog: Any, questions: list, answers: list) -> tuple[dict | None, str | None]:
    """The stored columns of one dialog (and its caption) or why it is unusable."""
    if not isinstance(dialog, dict):
        return None, "dialog entry is not an object"
    number = dialog.get("image_id")
    if isinstance(number, bool) or not isinstance(number, int):
        return None, f"image_id must be an integer, not {number!r}"
    reason = bad_text(dialog.get("caption"))
    if reason:
        return None, f"caption: {reason}"
    rounds = dialog.get("dialog")
    if not isinstance(rounds, list) or not rounds or len(rounds) > MAX_ROUNDS:
        return None, f"'dialog' must be a list of 1 to {MAX_ROUNDS} rounds"
    row: dict[str, Any] = {"caption": dialog["caption"].strip(), "dialog_questions": [], "dialog_answers": [],
                           "dialog_options": [], "dialog_gt_index": []}
    for r, entry in enumerate(rounds):
        parsed, reason = _round(entry, questions, answers, r + 1)
        if reason:
            return None, reason
        row["dialog_questions"].append(parsed["question"])
        row["dialog_answers"].append(parsed["answer"])
        row["dialog_options"].append(parsed["options"])
        row["dialog_gt_index"].append(parsed["gt_index"])
    return row, None
