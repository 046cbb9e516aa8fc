"""Load a training config: YAML file, ``key=value`` overrides, validation against the schema.

A config goes through three stages:

1. the YAML file is read into plain data (a mapping);
2. each ``key=value`` override is applied to that data (``optim.lr_head=1e-3``,
   ``tasks.0.weight=2``, ``model.lock.tower=text``);
3. the data is checked against the dataclass schema and built into nested dataclasses.

Every problem found in stages 2 and 3 is collected, and all of them are reported together
in one :class:`ConfigError`, one line per problem, each line starting with the key path::

    invalid config configs/x.yaml (2 problems):
    optim.lr_head: expected a float, got 'fast'
    trainer: unknown key (did you mean 'train'?)

Enumerated string fields are listed in :data:`CHOICES`, keyed by a path pattern in which ``*``
stands for any list index or mapping key; :func:`register_choice` adds allowed values.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from vlkit.config.schema import TrainConfig
from vlkit.errors import VlkitError

__all__ = [
    "CHOICES",
    "ConfigError",
    "MISSING",
    "config_to_dict",
    "dump_yaml",
    "load_config",
    "parse_overrides",
    "register_choice",
    "validate_config",
]

MISSING = "???"
"""A string default (or value) that marks a required value."""

CHOICES: dict[str, set[str]] = {
    "precision": {"fp32", "bf16", "fp16"},
    "distributed": {"ddp", "fsdp"},
    "device": {"auto", "cpu", "cuda"},
    "tasks.*.name": {"retrieval", "vqa", "itm", "classification"},
    "sampling.strategy": {"all", "round_robin", "proportional", "fixed", "temperature"},
    "tasks.*.loss": {"contrastive", "siglip", "momentum"},
    "model.lock.tower": {"image", "text"},
}
"""Allowed values of enumerated string fields, keyed by a dotted path pattern.

``*`` in a pattern matches one path segment: a list index (``tasks.*.loss``) or a mapping
key (``datasets.*.train_split``). Extend it with :func:`register_choice`.
"""


class ConfigError(VlkitError):
    """An invalid config; ``problems`` holds one ``"key.path: what is wrong"`` line per problem."""

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.source = source
        self.problems = list(problems)
        count = len(self.problems)
        header = f"invalid config {source} ({count} problem{'s' if count != 1 else ''}):"
        super().__init__("\n".join([header, *self.problems]))


def register_choice(pattern: str, *values: str) -> None:
    """Allow more values for an enumerated string field.

    Args:
        pattern: a dotted key path; ``*`` matches any list index or mapping key,
            e.g. ``"tasks.*.name"``. A new pattern makes that field enumerated.
        *values: the values to allow, e.g. ``"vqa"``.

    Raises:
        ValueError: if the pattern has an empty segment, no value is given, or a value is
            not a string.

    Example:
        >>> register_choice("tasks.*.name", "vqa")
    """
    if not pattern or any(not part for part in pattern.split(".")):
        raise ValueError(f"bad choice pattern {pattern!r}: expected dotted names like 'tasks.*.name'")
    if not values:
        raise ValueError("register_choice needs at least one value")
    for value in values:
        if not isinstance(value, str):
            raise ValueError(f"choice values must be strings, got {value!r}")
    CHOICES.setdefault(pattern, set()).update(values)


def _choices_for(path: Sequence[str]) -> set[str] | None:
    """The allowed values of the field at ``path``, or None when it is not enumerated."""
    found: set[str] | None = None
    for pattern, allowed in CHOICES.items():
        parts = pattern.split(".")
        if len(parts) == len(path) and all(p == "*" or p == s for p, s in zip(parts, path)):
            found = (found or set()) | allowed
    return found


# --------------------------------------------------------------------------------------------
# YAML: a safe loader that also reads ``1e-3`` as a float (plain PyYAML reads it as a string)
# --------------------------------------------------------------------------------------------

_EXP_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also resolves ``1e-3`` and ``1.0e3`` to floats."""


class _Dumper(yaml.SafeDumper):
    """``yaml.SafeDumper`` that quotes strings :class:`_Loader` would read as floats."""


for _cls in (_Loader, _Dumper):
    _cls.yaml_implicit_resolvers = {k: list(v) for k, v in _cls.yaml_implicit_resolvers.items()}
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _EXP_FLOAT, list("-+0123456789."))


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


def _read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML config file into a mapping (an empty file is an empty mapping)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise VlkitError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise VlkitError(f"config path is a directory, not a YAML file: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise VlkitError(f"cannot read config file {path}: {exc}") from None
    try:
        data = _yaml_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        column = f" (column {mark.column + 1})" if mark is not None else ""
        raise VlkitError(f"{where}: invalid YAML: {problem}{column}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise VlkitError(f"{path}: a config must be a YAML mapping of keys to values, got {_got(data)}")
    return data


# --------------------------------------------------------------------------------------------
# Type helpers
# --------------------------------------------------------------------------------------------

_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _is_union(tp: Any) -> bool:
    origin = typing.get_origin(tp)
    return origin is Union or (hasattr(types, "UnionType") and origin is types.UnionType)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    """``Optional[X]`` -> ``(X, True)``; anything else -> ``(tp, False)``."""
    if _is_union(tp):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)):
            return (args[0] if len(args) == 1 else Union[tuple(args)]), True
    return tp, False


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _describe(tp: Any) -> str:
    """How a type reads in an error message: ``an int``, ``a list of 2 floats``."""
    tp, optional = _strip_optional(tp)
    if optional:
        return f"{_describe(tp)} or null"
    if tp is Any:
        return "any value"
    if tp is bool:
        return "a bool (true or false)"
    if tp is int:
        return "an int"
    if tp is float:
        return "a float"
    if tp is str:
        return "a string"
    if _is_dataclass_type(tp):
        return "a mapping"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, Sequence):
        return "a list"
    if origin in (dict, Mapping):
        return "a mapping"
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return "a list"
        if args and all(a == args[0] for a in args):
            plural = _describe(args[0]).split(" ", 1)[-1]
            return f"a list of {len(args)} {plural}s"
        return f"a list of {len(args)} values"
    if _is_union(tp):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _got(value: Any) -> str:
    """How a wrong value reads in an error message, in YAML terms."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _join(path: Sequence[str]) -> str:
    return ".".join(path) if path else "<config>"


def _suggest(word: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(word), list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --------------------------------------------------------------------------------------------
# Validation and building
# --------------------------------------------------------------------------------------------


class _Bad:
    """Placeholder for a value that failed its check (its problem is already recorded)."""

    def __repr__(self) -> str:
        return "<invalid>"


_BAD = _Bad()


def _check(value: Any, tp: Any, path: list[str], problems: list[str]) -> Any:
    """Check ``value`` against type ``tp``; record problems; return the built value or ``_BAD``."""
    where = _join(path)
    if isinstance(value, str) and value == MISSING:
        problems.append(f"{where}: missing required value")
        return _BAD
    inner, optional = _strip_optional(tp)
    if value is None:
        if optional or tp is Any:
            return None
        problems.append(f"{where}: expected {_describe(inner)}, got null")
        return _BAD
    tp = inner
    if tp is Any:
        return copy.deepcopy(value)
    if _is_dataclass_type(tp):
        return _check_dataclass(value, tp, path, problems)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        if value in args:
            return value
        problems.append(f"{where}: expected {_describe(tp)}, got {_got(value)}")
        return _BAD
    if _is_union(tp):
        for member in args:
            trial: list[str] = []
            built = _check(value, member, path, trial)
            if not trial:
                return built
        problems.append(f"{where}: expected {_describe(tp)}, got {_got(value)}")
        return _BAD
    if origin in (list, Sequence):
        if not isinstance(value, list):
            problems.append(f"{where}: expected {_describe(tp)}, got {_got(value)}")
            return _BAD
        item_tp = args[0] if args else Any
        return [_check(v, item_tp, [*path, str(i)], problems) for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            problems.append(f"{where}: expected {_describe(tp)}, got {_got(value)}")
            return _BAD
        if len(args) == 2 and args[1] is Ellipsis:
            item_tps = [args[0]] * len(value)
        elif args and len(value) != len(args):
            problems.append(f"{where}: expected {_describe(tp)}, got {_got(value)}")
            return _BAD
        else:
            item_tps = list(args) or [Any] * len(value)
        return tuple(_check(v, t, [*path, str(i)], problems) for i, (v, t) in enumerate(zip(value, item_tps)))
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            problems.append(f"{where}: expected {_describe(tp)}, got {_got(value)}")
            return _BAD
        key_tp, value_tp = args if args else (Any, Any)
        out: dict[Any, Any] = {}
        for key, item in value.items():
            if key_tp is str and not isinstance(key, str):
                problems.append(f"{_join([*path, str(key)])}: keys must be strings, got {_got(key)}")
                continue
            out[key] = _check(item, value_tp, [*path, str(key)], problems)
        return out
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            allowed = _choices_for(path)
            if allowed is not None and value not in allowed:
                hint = _suggest(value, sorted(allowed))
                problems.append(f"{where}: {value!r} is not one of {', '.join(sorted(allowed))}{hint}")
                return _BAD
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            problems.append(f"{where}: expected a string, got {_got(value)} (quote it: '{value}')")
            return _BAD
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    problems.append(f"{where}: expected {_describe(tp)}, got {_got(value)}")
    return _BAD


def _check_dataclass(value: Any, cls: type, path: list[str], problems: list[str]) -> Any:
    if not isinstance(value, Mapping):
        problems.append(f"{_join(path)}: expected a mapping of {cls.__name__} keys, got {_got(value)}")
        return _BAD
    fields, hints = _fields(cls), _hints(cls)
    for key in value:
        if key not in fields:
            problems.append(f"{_join([*path, str(key)])}: unknown key{_suggest(str(key), list(fields))}")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        tp = hints[name]
        if name in value:
            kwargs[name] = _check(value[name], tp, [*path, name], problems)
            continue
        inner, optional = _strip_optional(tp)
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            problems.append(f"{_join([*path, name])}: missing required value")
            kwargs[name] = _BAD
            continue
        if _is_dataclass_type(inner) and default is not None:
            # a missing section: check its own defaults too (they may hold required values)
            kwargs[name] = _check(_plain(default), tp, [*path, name], problems)
        elif isinstance(default, str) and default == MISSING:
            problems.append(f"{_join([*path, name])}: missing required value")
            kwargs[name] = _BAD
        else:
            kwargs[name] = default
    return cls(**kwargs)


def _ok(*values: Any) -> bool:
    return all(v is not _BAD and v != MISSING for v in values)


def _cross_checks(cfg: TrainConfig, problems: list[str]) -> None:
    """Checks that involve more than one field of a :class:`TrainConfig`."""
    for name in ("epochs", "batch_size", "grad_accum"):
        value = getattr(cfg, name)
        if _ok(value) and value <= 0:
            problems.append(f"{name}: must be positive, got {value}")
    for name in ("max_steps", "log_every", "eval_every", "save_every"):
        value = getattr(cfg, name)
        if _ok(value) and value is not None and value <= 0:
            problems.append(f"{name}: must be positive (or null), got {value}")
    if _ok(cfg.peak_flops) and cfg.peak_flops is not None and not cfg.peak_flops > 0:
        problems.append(f"peak_flops: must be positive (FLOP/s of one device, e.g. 989.4e12) or null, "
                        f"got {cfg.peak_flops}")
    if _ok(cfg.ema) and cfg.ema is not None and not 0.0 < cfg.ema < 1.0:
        problems.append(f"ema: must be between 0 and 1 (e.g. 0.999) or null, got {cfg.ema}")
    if _ok(cfg.batch_size, cfg.grad_accum) and cfg.batch_size > 0 and cfg.grad_accum > 0:
        if cfg.batch_size % cfg.grad_accum:
            problems.append(
                f"batch_size: {cfg.batch_size} is not divisible by grad_accum {cfg.grad_accum}"
            )
    if _ok(cfg.tasks):
        if not cfg.tasks:
            problems.append("tasks: at least one task is required, e.g. [{name: retrieval, dataset: NAME}]")
        datasets = cfg.datasets if _ok(cfg.datasets) else None
        for i, task in enumerate(cfg.tasks):
            if datasets is None or not _ok(task) or not _ok(task.dataset) or task.dataset in datasets:
                continue
            if datasets:
                known = ", ".join(str(k) for k in datasets)
                hint = _suggest(task.dataset, [str(k) for k in datasets])
                problems.append(
                    f"tasks.{i}.dataset: {task.dataset!r} is not a key of datasets ({known}){hint}"
                )
            else:
                problems.append(f"tasks.{i}.dataset: {task.dataset!r} is not a key of datasets (none defined)")


def validate_config(data: Mapping[str, Any], schema: type = TrainConfig) -> tuple[Any, list[str]]:
    """Check plain config data against a schema and build it.

    Args:
        data: the config as plain data (what YAML gives).
        schema: the dataclass to build; cross-field checks run for :class:`TrainConfig`
            and its subclasses.

    Returns:
        ``(config, problems)``: the built config (meaningful only when ``problems`` is empty)
        and one ``"key.path: what is wrong"`` line per problem.
    """
    problems: list[str] = []
    cfg = _check_dataclass(data, schema, [], problems)
    if cfg is not _BAD and isinstance(cfg, TrainConfig):
        _cross_checks(cfg, problems)
    return cfg, problems


# --------------------------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------------------------


def parse_overrides(overrides: Sequence[str]) -> list[tuple[str, Any]]:
    """Split ``key=value`` strings into ``(key, value)``; values are parsed as YAML.

    Raises:
        ConfigError: listing every malformed override.
    """
    parsed, problems = _parse_overrides(overrides)
    if problems:
        raise ConfigError("overrides", problems)
    return [(key, value) for key, value, _ in parsed]


def _parse_overrides(overrides: Sequence[str]) -> tuple[list[tuple[str, Any, str]], list[str]]:
    parsed: list[tuple[str, Any, str]] = []
    problems: list[str] = []
    if isinstance(overrides, str):
        overrides = [overrides]
    for item in overrides:
        key, sep, text = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(f"{key or item}: override {item!r} is not key=value")
            continue
        if any(not part for part in key.split(".")):
            problems.append(f"{key}: malformed key in override {item!r} (expected dotted names like optim.lr_head)")
            continue
        if not text.strip():
            problems.append(
                f"{key}: override {item!r} has no value (use {key}=null for none)"
            )
            continue
        try:
            value = _yaml_load(text)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            problems.append(f"{key}: cannot parse the value of override {item!r}: {problem}")
            continue
        parsed.append((key, value, str(item)))
    return parsed, problems


def _container_for(tp: Any) -> Any:
    """An empty container to descend into for type ``tp`` (None if it cannot hold keys)."""
    tp, _ = _strip_optional(tp)
    if tp is Any or _is_dataclass_type(tp):
        return {}
    origin = typing.get_origin(tp)
    if origin in (dict, Mapping):
        return {}
    if origin in (list, Sequence, tuple):
        return []
    return None


def _field_default(cls: type, name: str) -> Any:
    f = _fields(cls)[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _descend_into(existing: Any, child_tp: Any, default: Any, here: list[str], key: str) -> tuple[Any, str | None]:
    """The container to walk into for the next key segment, created when absent or null."""
    expected = _container_for(child_tp)
    if expected is None:
        inner, _ = _strip_optional(child_tp)
        return None, f"{_join(here)}: holds {_describe(inner)}, not a section; cannot set {key}"
    if existing is None:
        fresh = _plain(default) if default is not None else expected
        return (fresh if type(fresh) is type(expected) else expected), None
    inner, _ = _strip_optional(child_tp)
    if isinstance(existing, type(expected)) or (inner is Any and isinstance(existing, (dict, list))):
        return existing, None
    return None, f"{_join(here)}: holds {_got(existing)}, not {_describe(inner)}; cannot set {key}"


def _apply_override(data: dict[str, Any], key: str, value: Any, schema: type) -> str | None:
    """Set ``key`` (a dotted path) to ``value`` in ``data``; return a problem line or None."""
    parts = key.split(".")
    node: Any = data
    tp: Any = schema
    for i, part in enumerate(parts):
        here = parts[: i + 1]
        last = i == len(parts) - 1
        inner, _ = _strip_optional(tp)
        origin, args = typing.get_origin(inner), typing.get_args(inner)
        if isinstance(node, list):
            if not part.isdigit():
                example = _join([*parts[:i], "0", *parts[i + 1:]])
                return f"{_join(here)}: {_join(parts[:i])} is a list; use an index, e.g. {example}"
            index = int(part)
            fixed = origin is tuple and not (len(args) == 2 and args[1] is Ellipsis)
            limit = len(node) if fixed else len(node) + 1
            if index >= limit:
                return f"{_join(here)}: index {index} is out of range ({_join(parts[:i])} has {len(node)} items)"
            if origin is tuple:
                child_tp = args[index] if fixed else args[0]
            else:
                child_tp = args[0] if args else Any
            if index == len(node):
                node.append(None)
            if last:
                node[index] = value
                return None
            child, problem = _descend_into(node[index], child_tp, None, here, key)
            if problem:
                return problem
            node[index] = child
            node, tp = child, child_tp
            continue
        default: Any = None
        if _is_dataclass_type(inner):
            fields = _fields(inner)
            if part not in fields:
                return f"{_join(here)}: unknown key{_suggest(part, list(fields))}"
            child_tp = _hints(inner)[part]
            default = _field_default(inner, part)
        else:
            child_tp = args[1] if origin in (dict, Mapping) and len(args) == 2 else Any
        if last:
            node[part] = value
            return None
        child, problem = _descend_into(node.get(part), child_tp, default, here, key)
        if problem:
            return problem
        node[part] = child
        node, tp = child, child_tp
    return None


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def load_config(
    path: str | Path | None,
    overrides: Sequence[str] = (),
    schema: type = TrainConfig,
) -> Any:
    """Read a YAML config, apply ``key=value`` overrides, validate it and build the dataclasses.

    Args:
        path: a YAML file, or None to start from the schema's defaults.
        overrides: ``key=value`` strings applied in order after the file is read. Keys are
            dotted paths (``optim.lr_head``, ``datasets.data.path``, ``tasks.0.weight``,
            ``model.args.vision_layers``); a section that is null or absent is created
            (``model.lock.tower=text``); ``tasks.N.*`` with N equal to the number of tasks
            appends a task. Values are parsed as YAML: ``1e-3``, ``true``, ``null``, ``[1, 2]``.
        schema: the dataclass to build, :class:`~vlkit.config.schema.TrainConfig` by default.

    Returns:
        An instance of ``schema``.

    Raises:
        VlkitError: when the file is missing or is not valid YAML (naming the file and line).
        ConfigError: listing every problem of the overrides and the config at once, one
            ``key.path: what is wrong`` line each.

    Example:
        >>> cfg = load_config("configs/synth_clip_tiny.yaml", ["optim.lr_head=1e-3", "epochs=2"])
    """
    source = str(path) if path is not None else "(defaults)"
    data: dict[str, Any] = _read_yaml(Path(path)) if path is not None else {}
    parsed, problems = _parse_overrides(overrides)
    for key, value, item in parsed:
        problem = _apply_override(data, key, value, schema)
        if problem is not None:
            problems.append(f"{problem} (in override {item!r})")
    cfg, more = validate_config(data, schema)
    problems.extend(more)
    if problems:
        raise ConfigError(source, problems)
    return cfg


def _plain(value: Any) -> Any:
    """Dataclasses, tuples and mappings as plain dicts and lists (copied)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return copy.deepcopy(value)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A config as plain data (dicts, lists, scalars) that :func:`load_config` reads back.

    Args:
        cfg: a config dataclass, e.g. a :class:`TrainConfig`.

    Returns:
        A new dict in schema field order; tuples become lists.
    """
    if not (dataclasses.is_dataclass(cfg) and not isinstance(cfg, type)):
        raise TypeError(f"config_to_dict expects a config dataclass, got {type(cfg).__name__}")
    return _plain(cfg)


def dump_yaml(cfg: Any, header: str | None = None) -> str:
    """The resolved config as YAML, e.g. to save as ``config.yaml`` in a run directory.

    Args:
        cfg: a config dataclass.
        header: optional text written first as ``#`` comment lines.

    Returns:
        YAML text that :func:`load_config` loads back to an equal config.
    """
    text = yaml.dump(
        config_to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True
    )
    if header:
        comments = "".join(f"# {line}".rstrip() + "\n" for line in header.splitlines())
        text = comments + text
    return text
