"""Tasks: what a task reads from a batch, its loss and its metrics. The trainer runs a list of them."""

from __future__ import annotations

from vlkit.errors import VlkitError

TASKS: dict[str, type] = {}


def register_task(name: str):
    """Decorator registering a task class under ``name`` (then ``tasks: [{name: NAME}]`` in a config chooses it)."""
    from vlkit.config.load import register_name

    def wrap(cls):
        TASKS[name] = cls
        register_name("tasks.*.name", name)
        return cls

    return wrap


def build_task(name: str, *args, **kwargs):
    from vlkit.tasks import captioning, classification, itm, nlvr2, retrieval, vqa  # noqa: F401  (the built-in tasks)
    from vlkit.tasks import mae, visdial  # noqa: F401
    from vlkit.tasks import video_classification, video_retrieval  # noqa: F401
    from vlkit.tasks import beit, vqvae  # noqa: F401

    if name not in TASKS:
        raise VlkitError(f"unknown task '{name}'; available: {sorted(TASKS)}")
    return TASKS[name](*args, **kwargs)
