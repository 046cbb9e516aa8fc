"""Check plain config data (what YAML gives) against the dataclass schema and build it.

Every problem is recorded, one ``"key.path: what is wrong"`` line each, and the checking goes on: a
config with several mistakes reports all of them at once. Three kinds of check run:

* types, from the dataclass annotations (``Optional``, lists, tuples, mappings, nested dataclasses);
* the allowed values of enumerated string fields (the ``choices`` table, see :data:`vlkit.config.load.CHOICES`);
* the range of every numeric field, declared in the schema with :func:`vlkit.config.schema.ranged`
  (on each item of a list or tuple of numbers);

then, for a :class:`~vlkit.config.schema.TrainConfig`, the checks that involve several fields.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from vlkit.config.optim_checks import early_stop_checks, optim_checks
from vlkit.config.schema import Range, TrainConfig
from vlkit.config.typeinfo import (MISSING, describe, field_default, fields, got, hints, is_dataclass_type,
                                   is_union, join, plain, strip_optional, suggest)


class _Bad:
    """Placeholder for a value that failed its check (its problem is already recorded)."""

    def __repr__(self) -> str:
        return "<invalid>"


BAD = _Bad()


def ok(*values: Any) -> bool:
    """True when none of ``values`` failed its check or is a missing required value."""
    return all(v is not BAD and v != MISSING for v in values)


def choices_for(path: Sequence[str], choices: Mapping[str, set[str]]) -> set[str] | None:
    """The allowed values of the field at ``path``, or None when it is not enumerated."""
    found: set[str] | None = None
    for pattern, allowed in choices.items():
        parts = pattern.split(".")
        if len(parts) == len(path) and all(p == "*" or p == s for p, s in zip(parts, path)):
            found = (found or set()) | allowed
    return found


class _Checker:
    """One validation: the choices table it checks strings against and the problems it found."""

    def __init__(self, choices: Mapping[str, set[str]]) -> None:
        self.choices = choices
        self.problems: list[str] = []

    def bad(self, path: Sequence[str], message: str) -> _Bad:
        self.problems.append(f"{join(path)}: {message}")
        return BAD

    def check(self, value: Any, tp: Any, path: list[str]) -> Any:
        """Check ``value`` against type ``tp``; record problems; return the built value or ``BAD``."""
        if isinstance(value, str) and value == MISSING:
            return self.bad(path, "missing required value")
        inner, optional = strip_optional(tp)
        if value is None:
            if optional or tp is Any:
                return None
            return self.bad(path, f"expected {describe(inner)}, got null")
        tp = inner
        if tp is Any:
            return copy.deepcopy(value)
        if is_dataclass_type(tp):
            return self.dataclass(value, tp, path)
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        wrong = f"expected {describe(tp)}, got {got(value)}"
        if origin is Literal:
            return value if value in args else self.bad(path, wrong)
        if is_union(tp):
            for member in args:
                trial = _Checker(self.choices)
                built = trial.check(value, member, path)
                if not trial.problems:
                    return built
            return self.bad(path, wrong)
        if origin in (list, Sequence):
            if not isinstance(value, list):
                return self.bad(path, wrong)
            item_tp = args[0] if args else Any
            return [self.check(v, item_tp, [*path, str(i)]) for i, v in enumerate(value)]
        if origin is tuple:
            if not isinstance(value, (list, tuple)):
                return self.bad(path, wrong)
            if len(args) == 2 and args[1] is Ellipsis:
                item_tps = [args[0]] * len(value)
            elif args and len(value) != len(args):
                return self.bad(path, wrong)
            else:
                item_tps = list(args) or [Any] * len(value)
            return tuple(self.check(v, t, [*path, str(i)]) for i, (v, t) in enumerate(zip(value, item_tps)))
        if origin in (dict, Mapping):
            if not isinstance(value, Mapping):
                return self.bad(path, wrong)
            key_tp, value_tp = args if args else (Any, Any)
            out: dict[Any, Any] = {}
            for key, item in value.items():
                if key_tp is str and not isinstance(key, str):
                    self.bad([*path, str(key)], f"keys must be strings, got {got(key)}")
                    continue
                out[key] = self.check(item, value_tp, [*path, str(key)])
            return out
        return self.scalar(value, tp, path)

    def scalar(self, value: Any, tp: Any, path: list[str]) -> Any:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if tp is bool and isinstance(value, bool):
            return value
        if tp is int and number and isinstance(value, int):
            return value
        if tp is float and number:
            return float(value)
        if tp is str and isinstance(value, str):
            allowed = choices_for(path, self.choices)
            if allowed is not None and value not in allowed:
                hint = suggest(value, sorted(allowed))
                return self.bad(path, f"{value!r} is not one of {', '.join(sorted(allowed))}{hint}")
            return value
        if tp is str and number:
            return self.bad(path, f"expected a string, got {got(value)} (quote it: '{value}')")
        if tp not in (bool, int, float, str) and isinstance(tp, type) and isinstance(value, tp):
            return value
        return self.bad(path, f"expected {describe(tp)}, got {got(value)}")

    def in_range(self, value: Any, rng: Range, optional: bool, path: list[str]) -> Any:
        """``value`` (or each number of a list or tuple) within ``rng``; ``BAD`` when one is not."""
        if not ok(value) or value is None:
            return value
        name = path[-1]
        items = [([*path, str(i)], v) for i, v in enumerate(value)] if isinstance(value, (list, tuple)) else [
            (path, value)]
        fine = True
        for where, v in items:
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not rng.contains(v):
                null = " or null" if optional and where is path else ""
                self.bad(where, f"must be {rng.describe(name)}{null}, got {got(v)}")
                fine = False
        return value if fine else BAD

    def dataclass(self, value: Any, cls: type, path: list[str]) -> Any:
        if not isinstance(value, Mapping):
            return self.bad(path, f"expected a mapping of {cls.__name__} keys, got {got(value)}")
        known, types_ = fields(cls), hints(cls)
        for key in value:
            if key not in known:
                self.bad([*path, str(key)], f"unknown key{suggest(str(key), list(known))}")
        kwargs: dict[str, Any] = {}
        for name, f in known.items():
            tp, here = types_[name], [*path, name]
            if name in value:
                built = self.check(value[name], tp, here)
                rng = f.metadata.get("range")
                kwargs[name] = self.in_range(built, rng, strip_optional(tp)[1], here) if rng else built
                continue
            inner, _ = strip_optional(tp)
            default = field_default(f)
            if default is dataclasses.MISSING or (isinstance(default, str) and default == MISSING):
                kwargs[name] = self.bad(here, "missing required value")
            elif is_dataclass_type(inner) and default is not None:
                # a missing section: check its own defaults too (they may hold required values)
                kwargs[name] = self.check(plain(default), tp, here)
            else:
                kwargs[name] = default
        return cls(**kwargs)


def _sampling_checks(cfg: TrainConfig, data: Mapping[str, Any], problems: list[str]) -> None:
    """The sampling weights and temperature: set only where their strategy reads them (a saved config
    holds ``weights: null`` and the default temperature whatever the strategy)."""
    sampling, given = cfg.sampling, data.get("sampling")
    given = given if isinstance(given, Mapping) else {}
    if not ok(sampling) or not ok(sampling.strategy):
        return
    strategy, weights = sampling.strategy, sampling.weights
    if strategy == "fixed" and ok(weights) and (weights is None or ok(*weights)):
        if weights is None:
            problems.append("sampling.weights: strategy 'fixed' needs one weight per task, e.g. [1.0, 2.0]")
        elif ok(cfg.tasks) and len(weights) != len(cfg.tasks):
            problems.append(f"sampling.weights: {len(weights)} weights for {len(cfg.tasks)} tasks; "
                            f"give one weight per task")
        elif not sum(weights) > 0:
            problems.append("sampling.weights: all weights are zero; at least one task needs a positive weight")
    if strategy != "fixed" and given.get("weights") is not None:
        problems.append(f"sampling.weights: only strategy 'fixed' reads them (strategy is {strategy!r}); "
                        f"remove them or set sampling.strategy=fixed")
    default = field_default(fields(type(sampling))["temperature"])
    if strategy != "temperature" and ok(sampling.temperature) and sampling.temperature != default:
        problems.append(f"sampling.temperature: only strategy 'temperature' reads it (strategy is {strategy!r}); "
                        f"remove it or set sampling.strategy=temperature")


#: task keys only some tasks read
TRAIN_CAPTIONS = ("random", "first", "longest")
CAPTION_CHOICE_TASKS = ("retrieval", "itm", "captioning")
GENERATION_KEYS = ("label_smoothing", "num_beams", "max_new_tokens", "min_new_tokens", "no_repeat_ngram_size",
                   "eval_images")
GENERATIVE_TASKS = ("captioning", "vqa")
DIALOG_KEYS = ("negatives", "history_rounds")  # the visdial task's


def _task_checks(cfg: TrainConfig, problems: list[str]) -> None:
    """A loss or metric the task does not have (the registries say which), a loss the model cannot train with,
    and captioning keys set on a task that would not read them."""
    from vlkit.metrics.registry import metric_names
    from vlkit.modules.losses.registry import get_loss, loss_names, model_problem

    model_name = cfg.model.name if ok(cfg.model) and ok(cfg.model.name) else None
    for i, task in enumerate(cfg.tasks):
        if not ok(task) or not ok(task.name):
            continue
        if ok(task.metrics):
            known = metric_names(task.name)
            for j, metric in enumerate(task.metrics):
                if ok(metric) and metric not in known:
                    listed = ", ".join(sorted(known)) or "none registered"
                    problems.append(f"tasks.{i}.metrics.{j}: task {task.name} has no metric {metric!r} ({listed}); "
                                    f"register it with vlkit.metrics.registry.register_metric in a module of imports")
        if ok(task.captions) and task.captions != "random":
            if task.captions not in TRAIN_CAPTIONS:
                problems.append(f"tasks.{i}.captions: {task.captions!r} is not one of {', '.join(TRAIN_CAPTIONS)}")
            elif task.name not in CAPTION_CHOICE_TASKS:
                problems.append(f"tasks.{i}.captions: only the {', '.join(CAPTION_CHOICE_TASKS)} tasks read it "
                                f"(task is {task.name!r}); remove it")
        if task.name == "beit" and not task.tokenizer_run:
            problems.append(f"tasks.{i}.tokenizer_run: task beit needs the run (or model folder) of a trained "
                            f"VQ-VAE tokenizer (e.g. one trained by the vqvae_synth recipe)")
        elif task.name != "beit" and task.tokenizer_run is not None:
            problems.append(f"tasks.{i}.tokenizer_run: only the beit task reads it (task is {task.name!r}); remove it")
        if task.name != "visdial":
            for key in DIALOG_KEYS:
                value = getattr(task, key)
                if ok(value) and value != field_default(fields(type(task))[key]):
                    problems.append(f"tasks.{i}.{key}: only the visdial task reads it (task is {task.name!r}); "
                                    "remove it")
        if not ok(task.loss):
            continue
        allowed = loss_names(task.name)
        if task.loss is not None and task.loss not in allowed:
            what = f"one of {', '.join(sorted(allowed))}" if allowed else "left out (it has one loss)"
            problems.append(f"tasks.{i}.loss: task {task.name} has no loss {task.loss!r}; it must be {what}")
        elif task.loss is not None and model_name is not None:
            why = model_problem(get_loss(task.name, task.loss), model_name)
            if why:
                problems.append(f"tasks.{i}.loss: task {task.name} cannot train model {model_name!r} with loss "
                                f"{task.loss!r}: {why}")
        if task.name in GENERATIVE_TASKS:
            continue
        defaults = fields(type(task))
        for key in GENERATION_KEYS:
            value = getattr(task, key)
            if ok(value) and value != field_default(defaults[key]):
                problems.append(f"tasks.{i}.{key}: only the captioning and vqa tasks read it (task is "
                                f"{task.name!r}); remove it")


def cross_checks(cfg: TrainConfig, data: Mapping[str, Any], problems: list[str]) -> None:
    """Checks that involve more than one field of a :class:`TrainConfig` (``data``: the raw mapping)."""
    if ok(cfg.batch_size, cfg.grad_accum) and cfg.batch_size % cfg.grad_accum:
        problems.append(f"batch_size: {cfg.batch_size} is not divisible by grad_accum {cfg.grad_accum}")
    _sampling_checks(cfg, data, problems)
    if ok(cfg.optim):
        optim_checks(cfg.optim, problems)
    if ok(cfg.early_stop) and cfg.early_stop is not None and ok(cfg.tasks):
        early_stop_checks(cfg, problems)
    if not ok(cfg.tasks):
        return
    if not cfg.tasks:
        problems.append("tasks: at least one task is required, e.g. [{name: retrieval, dataset: NAME}]")
    datasets = cfg.datasets if ok(cfg.datasets) else None
    _task_checks(cfg, problems)
    for i, task in enumerate(cfg.tasks):
        if datasets is None or not ok(task) or not ok(task.dataset) or task.dataset in datasets:
            continue
        if datasets:
            known = ", ".join(str(k) for k in datasets)
            hint = suggest(task.dataset, [str(k) for k in datasets])
            problems.append(f"tasks.{i}.dataset: {task.dataset!r} is not a key of datasets ({known}){hint}")
        else:
            problems.append(f"tasks.{i}.dataset: {task.dataset!r} is not a key of datasets (none defined)")


def validate(data: Mapping[str, Any], schema: type, choices: Mapping[str, set[str]]) -> tuple[Any, list[str]]:
    """Check plain config data against ``schema`` and build it.

    Args:
        data: the config as plain data.
        schema: the dataclass to build; cross-field checks run for :class:`TrainConfig` and its subclasses.
        choices: allowed values of enumerated string fields by path pattern (``*``: any segment).

    Returns:
        ``(config, problems)``: the built config (meaningful only when ``problems`` is empty) and one
        ``"key.path: what is wrong"`` line per problem.
    """
    checker = _Checker(choices)
    cfg = checker.dataclass(data, schema, [])
    if cfg is not BAD and isinstance(cfg, TrainConfig):
        cross_checks(cfg, data, checker.problems)
    return cfg, checker.problems
