"""Type helpers of the config validation: how a schema type and a wrong value read in an error message,
``Optional`` unwrapping, dataclass fields and defaults, suggestions for misspelt keys, and :class:`ConfigError`."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union

from vlkit.errors import VlkitError

MISSING = "???"
"""A string default (or value) that marks a required value."""


class ConfigError(VlkitError):
    """An invalid config; ``problems`` holds one ``"key.path: what is wrong"`` line per problem."""

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.source = source
        self.problems = list(problems)
        count = len(self.problems)
        header = f"invalid config {source} ({count} problem{'s' if count != 1 else ''}):"
        super().__init__("\n".join([header, *self.problems]))


_HINTS: dict[type, dict[str, Any]] = {}


def hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def is_union(tp: Any) -> bool:
    origin = typing.get_origin(tp)
    return origin is Union or (hasattr(types, "UnionType") and origin is types.UnionType)


def strip_optional(tp: Any) -> tuple[Any, bool]:
    """``Optional[X]`` -> ``(X, True)``; anything else -> ``(tp, False)``."""
    if is_union(tp):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)):
            return (args[0] if len(args) == 1 else Union[tuple(args)]), True
    return tp, False


def is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def describe(tp: Any) -> str:
    """How a type reads in an error message: ``an int``, ``a list of 2 floats``."""
    tp, optional = strip_optional(tp)
    if optional:
        return f"{describe(tp)} or null"
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
    if is_dataclass_type(tp):
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
            plural = describe(args[0]).split(" ", 1)[-1]
            return f"a list of {len(args)} {plural}s"
        return f"a list of {len(args)} values"
    if is_union(tp):
        return " or ".join(describe(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def got(value: Any) -> str:
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


def join(path: Sequence[str]) -> str:
    return ".".join(path) if path else "<config>"


def suggest(word: str, options: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` for a misspelt key, naming every key it begins when it is a stem of several
    (``lr`` -> ``'lr_head', 'lr_image' or 'lr_text'``); empty when nothing is close."""
    word = str(word)
    starts = sorted(o for o in options if o != word and o.startswith(word)) if len(word) >= 2 else []
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    names = [*close, *(o for o in starts if o not in close)]
    if not names:
        return ""
    quoted = [repr(n) for n in names]
    listed = quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
    return f" (did you mean {listed}?)"


def plain(value: Any) -> Any:
    """Dataclasses, tuples and mappings as plain dicts and lists (copied)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return copy.deepcopy(value)


def field_default(f: dataclasses.Field) -> Any:
    """A field's default value (a fresh one from its factory), or ``dataclasses.MISSING``."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING
