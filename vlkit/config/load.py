"""Load a training config: YAML file, ``key=value`` overrides, validation against the schema.

A config goes through three stages:

1. the YAML file is read into plain data (a mapping);
2. each ``key=value`` override is applied to that data (``optim.lr_head=1e-3``,
   ``tasks.0.weight=2``, ``model.lock.tower=text``);
3. the data is checked against the dataclass schema and built into nested dataclasses.

Every problem found in stages 2 and 3 is collected, and all of them are reported together
in one :class:`ConfigError`, one line per problem, each line starting with the key path::

    invalid config my.yaml (2 problems):
    optim.lr_head: expected a float, got 'fast'
    trainer: unknown key (did you mean 'train'?)

Enumerated string fields are listed in :data:`CHOICES`, keyed by a path pattern in which ``*``
stands for any list index or mapping key; :func:`register_choice` adds allowed values. Numeric fields
declare their ranges in the schema (:func:`vlkit.config.schema.ranged`).

The work is shared by :mod:`vlkit.config.yaml_io` (reading YAML), :mod:`vlkit.config.overrides`,
:mod:`vlkit.config.validate` and :mod:`vlkit.config.typeinfo`; this module is the public face.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from vlkit.config.imports import import_plugins
from vlkit.config.overrides import apply_override, parse_overrides, split_overrides
from vlkit.config.schema import TrainConfig
from vlkit.config.typeinfo import MISSING, ConfigError, plain
from vlkit.config.validate import validate
from vlkit.config.yaml_io import YamlDumper, read_yaml

__all__ = [
    "CHOICES",
    "ConfigError",
    "MISSING",
    "config_to_dict",
    "dump_yaml",
    "load_config",
    "parse_overrides",
    "register_choice",
    "register_name",
    "validate_config",
]

CHOICES: dict[str, set[str]] = {
    "precision": {"fp32", "bf16", "fp16"},
    "distributed": {"ddp", "fsdp"},
    "device": {"auto", "cpu", "cuda"},
    "tasks.*.name": {"retrieval", "captioning", "vqa", "itm", "classification", "nlvr2", "visdial", "mae",
                     "vqvae", "beit", "video_classification",
                     "video_retrieval"},
    "sampling.strategy": {"all", "round_robin", "proportional", "fixed", "temperature"},
    "model.lock.tower": {"image", "text"},
    "nonfinite": {"stop", "skip"},
    "optim.name": {"adamw", "sgd", "adafactor", "lamb"},
    "optim.schedule": {"cosine", "linear", "polynomial", "constant", "step", "inverse_sqrt"},
    "early_stop.mode": {"max", "min"},
}
"""Allowed values of enumerated string fields, keyed by a dotted path pattern.

``*`` in a pattern matches one path segment: a list index (``tasks.*.loss``) or a mapping
key (``datasets.*.train_split``). Extend it with :func:`register_choice`. The names that registries add
(``register_task``, ``register_optimizer``, ``register_schedule``) are kept apart in :data:`REGISTERED_CHOICES`
and allowed as well; the losses of ``tasks.*.loss`` and the metrics of ``tasks.*.metrics`` are read from their
registries (:mod:`vlkit.modules.losses.registry`, :mod:`vlkit.metrics.registry`) when a config is validated.
"""

REGISTERED_CHOICES: dict[str, set[str]] = {}
"""Values that registries added (:func:`register_name`), by path pattern; allowed like :data:`CHOICES`."""


def register_name(pattern: str, name: str) -> None:
    """Allow ``name`` at ``pattern`` because a registry now holds it (e.g. ``"tasks.*.name"``, a task's name).

    Args:
        pattern: a dotted key path as in :data:`CHOICES`.
        name: the registered name.
    """
    REGISTERED_CHOICES.setdefault(pattern, set()).add(name)


def _all_choices() -> dict[str, set[str]]:
    from vlkit.modules.losses.registry import loss_names

    table = {pattern: set(values) for pattern, values in CHOICES.items()}
    for pattern, values in REGISTERED_CHOICES.items():
        table.setdefault(pattern, set()).update(values)
    table.setdefault("tasks.*.loss", set()).update(loss_names())
    return table


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


def validate_config(data: Mapping[str, Any], schema: type = TrainConfig) -> tuple[Any, list[str]]:
    """Check plain config data against a schema and build it (types, :data:`CHOICES`, the ranges the
    schema declares, and the cross-field checks of a :class:`TrainConfig`; see :mod:`vlkit.config.validate`).

    Args:
        data: the config as plain data (what YAML gives).
        schema: the dataclass to build; cross-field checks run for :class:`TrainConfig`
            and its subclasses.

    Returns:
        ``(config, problems)``: the built config (meaningful only when ``problems`` is empty)
        and one ``"key.path: what is wrong"`` line per problem.
    """
    return validate(data, schema, _all_choices())


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

    The modules the config's ``imports`` key names are imported (after the overrides, before the validation;
    see :mod:`vlkit.config.imports`).

    Raises:
        VlkitError: when the file is missing or is not valid YAML (naming the file and line), or a module of
            ``imports`` fails to import (naming the key and the module).
        ConfigError: listing every problem of the overrides and the config at once, one
            ``key.path: what is wrong`` line each.

    Example:
        >>> cfg = load_config(recipe_path("synth_clip_tiny"), ["optim.lr_head=1e-3", "epochs=2"])
    """
    source = str(path) if path is not None else "(defaults)"
    data: dict[str, Any] = read_yaml(Path(path)) if path is not None else {}
    parsed, problems = split_overrides(overrides)
    for key, value, item in parsed:
        problem = apply_override(data, key, value, schema)
        if problem is not None:
            problems.append(f"{problem} (in override {item!r})")
    if not problems:  # plug-ins register their names before the config is checked
        import_plugins(data, Path(path).parent if path is not None else None, source)
    cfg, more = validate_config(data, schema)
    problems.extend(more)
    if problems:
        raise ConfigError(source, problems)
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A config as plain data (dicts, lists, scalars) that :func:`load_config` reads back.

    Args:
        cfg: a config dataclass, e.g. a :class:`TrainConfig`.

    Returns:
        A new dict in schema field order; tuples become lists.
    """
    if not (dataclasses.is_dataclass(cfg) and not isinstance(cfg, type)):
        raise TypeError(f"config_to_dict expects a config dataclass, got {type(cfg).__name__}")
    return plain(cfg)


def dump_yaml(cfg: Any, header: str | None = None) -> str:
    """The resolved config as YAML, e.g. to save as ``config.yaml`` in a run directory.

    Args:
        cfg: a config dataclass.
        header: optional text written first as ``#`` comment lines.

    Returns:
        YAML text that :func:`load_config` loads back to an equal config.
    """
    text = yaml.dump(
        config_to_dict(cfg), Dumper=YamlDumper, sort_keys=False, default_flow_style=False, allow_unicode=True
    )
    if header:
        comments = "".join(f"# {line}".rstrip() + "\n" for line in header.splitlines())
        text = comments + text
    return text
