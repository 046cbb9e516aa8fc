"""YAML for configs: a safe loader that also reads ``1e-3`` as a float (plain PyYAML reads it as a string),
and a dumper that quotes the strings that loader would read as floats."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from vlkit.config.typeinfo import got
from vlkit.errors import VlkitError

_EXP_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")


class YamlLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also resolves ``1e-3`` and ``1.0e3`` to floats."""


class YamlDumper(yaml.SafeDumper):
    """``yaml.SafeDumper`` that quotes strings :class:`YamlLoader` would read as floats."""


for _cls in (YamlLoader, YamlDumper):
    _cls.yaml_implicit_resolvers = {k: list(v) for k, v in _cls.yaml_implicit_resolvers.items()}
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _EXP_FLOAT, list("-+0123456789."))


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=YamlLoader)  # noqa: S506 - YamlLoader is a SafeLoader


def read_yaml(path: Path) -> dict[str, Any]:
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
        data = yaml_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        column = f" (column {mark.column + 1})" if mark is not None else ""
        raise VlkitError(f"{where}: invalid YAML: {problem}{column}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise VlkitError(f"{path}: a config must be a YAML mapping of keys to values, got {got(data)}")
    return data
