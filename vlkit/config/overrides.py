"""``key=value`` overrides of a config: parsing them, and setting each dotted key in the plain config data
(creating a section that is null or absent, appending a list item), guided by the schema's types."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from vlkit.config.typeinfo import (ConfigError, describe, field_default, fields, got, hints, is_dataclass_type,
                                   join, plain, strip_optional, suggest)
from vlkit.config.yaml_io import yaml_load


def parse_overrides(overrides: Sequence[str]) -> list[tuple[str, Any]]:
    """Split ``key=value`` strings into ``(key, value)``; values are parsed as YAML.

    Raises:
        ConfigError: listing every malformed override.
    """
    parsed, problems = split_overrides(overrides)
    if problems:
        raise ConfigError("overrides", problems)
    return [(key, value) for key, value, _ in parsed]


def split_overrides(overrides: Sequence[str]) -> tuple[list[tuple[str, Any, str]], list[str]]:
    """``(key, value, item)`` for each well-formed override and one problem line for each malformed one."""
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
            value = yaml_load(text)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            problems.append(f"{key}: cannot parse the value of override {item!r}: {problem}")
            continue
        parsed.append((key, value, str(item)))
    return parsed, problems


def _container_for(tp: Any) -> Any:
    """An empty container to descend into for type ``tp`` (None if it cannot hold keys)."""
    tp, _ = strip_optional(tp)
    if tp is Any or is_dataclass_type(tp):
        return {}
    origin = typing.get_origin(tp)
    if origin in (dict, Mapping):
        return {}
    if origin in (list, Sequence, tuple):
        return []
    return None


def _descend_into(existing: Any, child_tp: Any, default: Any, here: list[str], key: str) -> tuple[Any, str | None]:
    """The container to walk into for the next key segment, created when absent or null."""
    expected = _container_for(child_tp)
    if expected is None:
        inner, _ = strip_optional(child_tp)
        return None, f"{join(here)}: holds {describe(inner)}, not a section; cannot set {key}"
    if existing is None:
        fresh = plain(default) if default is not None else expected
        return (fresh if type(fresh) is type(expected) else expected), None
    inner, _ = strip_optional(child_tp)
    if isinstance(existing, type(expected)) or (inner is Any and isinstance(existing, (dict, list))):
        return existing, None
    return None, f"{join(here)}: holds {got(existing)}, not {describe(inner)}; cannot set {key}"


def apply_override(data: dict[str, Any], key: str, value: Any, schema: type) -> str | None:
    """Set ``key`` (a dotted path) to ``value`` in ``data``; return a problem line or None."""
    parts = key.split(".")
    node: Any = data
    tp: Any = schema
    for i, part in enumerate(parts):
        here = parts[: i + 1]
        last = i == len(parts) - 1
        inner, _ = strip_optional(tp)
        origin, args = typing.get_origin(inner), typing.get_args(inner)
        if isinstance(node, list):
            if not part.isdigit():
                example = join([*parts[:i], "0", *parts[i + 1:]])
                return f"{join(here)}: {join(parts[:i])} is a list; use an index, e.g. {example}"
            index = int(part)
            fixed = origin is tuple and not (len(args) == 2 and args[1] is Ellipsis)
            limit = len(node) if fixed else len(node) + 1
            if index >= limit:
                return f"{join(here)}: index {index} is out of range ({join(parts[:i])} has {len(node)} items)"
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
        if is_dataclass_type(inner):
            known = fields(inner)
            if part not in known:
                return f"{join(here)}: unknown key{suggest(part, list(known))}"
            child_tp = hints(inner)[part]
            default = field_default(fields(inner)[part])
            default = None if default is dataclasses.MISSING else default
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
