"""Class labels at ingest: labels a source gives are kept as given; names without a label get one.

A dataset keeps its class names by label in its schema metadata (``vlkit.classes``). A source's
``label``/``class_name`` pairs must agree with each other and with the classes already stored: a label number
with two different names is a problem and the rows that disagree with the first pairing seen (or the stored
one) are skipped. One name under two label numbers (ImageNet has two classes called "crane") keeps both
classes and their rows as given, and is reported as a notice: prompts built from class names cannot tell them
apart. Class names without a label (class folders) keep the
label stored for that name, or get the next free labels in sorted name order.
"""

from __future__ import annotations

from typing import Iterable

from vlkit.data.records import Problem, Record


def placeholder(label: int) -> str:
    """The name kept for a label no class name has been given for."""
    return f"class_{label}"


def classes_from_rows(labels: Iterable[int | None], names: Iterable[str | None]) -> list[str]:
    """Class names by label from rows' ``label`` and ``class_name`` (the first name seen for each label).

    For datasets without a stored class list. A label no row names gets :func:`placeholder`; no labels: ``[]``.
    """
    by_label: dict[int, str] = {}
    top = -1
    for label, name in zip(labels, names):
        if label is None:
            continue
        top = max(top, int(label))
        if name is not None:
            by_label.setdefault(int(label), name)
    return [by_label.get(i, placeholder(i)) for i in range(top + 1)]


def assign_classes(records: list[Record], stored: list[str], problems: list[Problem],
                   notices: list[Problem] | None = None,
                   stored_labels: Iterable[int] = ()) -> tuple[list[Record], list[str]]:
    """Check the given labels, label the named classes, and return the usable records and the class list.

    A label is taken once anything uses it: a stored class (named or a placeholder), a stored row, or a record
    here, with or without a name. New class names get labels after all of them, so a new class never merges
    with rows that carry a label without a name; and the class list covers every label, unnamed ones as
    placeholders.

    Args:
        records: the new records (their ``label`` may be set by the source, or None).
        stored: the class names by label already stored in the dataset.
        problems: where a record whose label and name disagree is reported.
        notices: where a class name shared by two labels is reported (once per name and label).
        stored_labels: labels the dataset's rows already carry (they may lie beyond ``stored``).

    Returns:
        The records that agree, labelled; and the class names by label (gaps named ``class_<i>``).
    """
    stored_labels = [int(x) for x in stored_labels]
    names: dict[int, str] = {i: n for i, n in enumerate(stored) if n != placeholder(i)}
    labels: dict[str, int] = {}
    for i, name in names.items():
        labels.setdefault(name, i)
    where: dict[object, str] = {}  # label or name -> where it was first given
    shared: set[tuple[str, int]] = set()  # (name, label) pairs already noticed
    usable = []
    for rec in records:
        if rec.label is None or rec.class_name is None:
            usable.append(rec)
            continue
        reason = _disagreement(rec, names, where)
        if reason:
            problems.append(Problem(rec.source, None, reason))
            continue
        other = labels.get(rec.class_name)
        if other is not None and other != rec.label and (rec.class_name, rec.label) not in shared:
            shared.add((rec.class_name, rec.label))
            seen = f"at {where[rec.class_name]}" if rec.class_name in where else "in the dataset"
            if notices is not None:
                notices.append(Problem(rec.source, None, f"class {rec.class_name!r} has label {rec.label} here and "
                                       f"label {other} {seen}: both kept, but prompts built from class names "
                                       "cannot tell them apart"))
        names[rec.label] = rec.class_name
        labels.setdefault(rec.class_name, rec.label)
        where.setdefault(rec.label, rec.source)
        where.setdefault(rec.class_name, rec.source)
        usable.append(rec)
    # every label in use, named or not, is taken: the stored list, labels stored rows carry, labels given here
    taken = max([len(stored) - 1, *names, *stored_labels, *(r.label for r in usable if r.label is not None)],
                default=-1)
    unlabelled = sorted({r.class_name for r in usable if r.label is None and r.class_name is not None})
    for name in unlabelled:
        if name not in labels:
            taken += 1
            labels[name], names[taken] = taken, name
    for rec in usable:
        if rec.label is None and rec.class_name is not None:
            rec.label = labels[rec.class_name]
    if not names:
        return usable, list(stored)
    return usable, [names.get(i, placeholder(i)) for i in range(taken + 1)]


def _disagreement(rec: Record, names: dict[int, str], where: dict[object, str]) -> str | None:
    """Why ``rec``'s label and name disagree with the pairs seen so far, or None."""
    known = names.get(rec.label)
    if known is not None and known != rec.class_name:
        seen = f"at {where[rec.label]}" if rec.label in where else "in the dataset"
        return f"label {rec.label} is named {rec.class_name!r} here but {known!r} {seen}"
    return None
