"""Tasks: what a task reads from a batch, its loss and its metrics. The trainer runs a list of them."""

from __future__ import annotations

from vlkit.errors import VlkitError

TASKS: dict[str, type] = {}


def register_task(name: str):
    def wrap(cls):
        TASKS[name] = cls
        return cls

    return wrap


def build_task(name: str, *args, **kwargs):
    from vlkit.tasks import captioning, classification, itm, retrieval, vqa  # noqa: F401  (registers the built-in tasks)

    if name not in TASKS:
        raise VlkitError(f"unknown task '{name}'; available: {sorted(TASKS)}")
    return TASKS[name](*args, **kwargs)
