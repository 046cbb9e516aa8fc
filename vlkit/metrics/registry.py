"""Named metrics that a task's ``metrics:`` key adds to its evaluation.

A metric is registered for one task and computed from that task's validation predictions, a mapping the
task documents. The retrieval task gives::

    {"image_embeds": Tensor [images, dim], "text_embeds": Tensor [texts, dim],
     "text_image": Tensor [texts] (the row of image_embeds each text describes)}

A metric returns a number, logged as ``val/<dataset>/<name>``, or a mapping of numbers, each logged as
``val/<dataset>/<name>_<key>``.

Example:
    >>> @register_metric("mean_pair_sim", task="retrieval")
    ... def mean_pair_sim(p):
    ...     return float((p["image_embeds"][p["text_image"]] * p["text_embeds"]).sum(-1).mean())

This module imports nothing heavy: the config validation reads the names from it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Callable

from vlkit.errors import VlkitError

_METRICS: dict[tuple[str, str], Callable[[Mapping[str, Any]], Any]] = {}


def register_metric(name: str, task: str = "retrieval") -> Callable[[Callable], Callable]:
    """Decorator registering a metric that ``tasks: [{name: TASK, metrics: [NAME]}]`` adds.

    Args:
        name: the metric's name (unique per task).
        task: the task whose predictions it reads.

    Raises:
        ValueError: the name is already registered for that task.
    """

    def wrap(fn: Callable[[Mapping[str, Any]], Any]) -> Callable[[Mapping[str, Any]], Any]:
        if (task, name) in _METRICS:
            raise ValueError(f"metric {name!r} of task {task!r} is already registered")
        _METRICS[(task, name)] = fn
        return fn

    return wrap


def metric_names(task: str | None = None) -> set[str]:
    """The registered metric names, of one task or of every task."""
    return {name for (t, name) in _METRICS if task is None or t == task}


def compute_metrics(task: str, names: Sequence[str], predictions: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """Each named metric of ``task`` over ``predictions``, as ``{prefix + name: value}``.

    Args:
        task: the task's name.
        names: the metrics the task's config lists.
        predictions: what the task predicted on its validation split (see the module's docstring).
        prefix: e.g. ``val/<dataset>/``.

    Raises:
        VlkitError: an unknown metric, or one that returns something other than a finite number or a
            mapping of them (naming the metric).
    """
    out: dict[str, float] = {}
    for name in names:
        fn = _METRICS.get((task, name))
        if fn is None:
            raise VlkitError(f"task {task}: unknown metric {name!r}; registered: {sorted(metric_names(task))}")
        value = fn(predictions)
        items = value.items() if isinstance(value, Mapping) else [(None, value)]
        for key, v in items:
            try:
                number = float(v)
            except (TypeError, ValueError):
                raise VlkitError(f"task {task}: metric {name!r} returned {type(v).__name__}, not a number") from None
            if not math.isfinite(number):
                raise VlkitError(f"task {task}: metric {name!r} returned {number}")
            out[f"{prefix}{name}" + (f"_{key}" if key is not None else "")] = number
    return out
