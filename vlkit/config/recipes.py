"""Shipped config recipes: the YAML files in the package's ``vlkit/configs/`` directory.

The recipes are package data, so a checkout, an editable install and an installed wheel all find
the same files in the same place.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import vlkit
from vlkit.errors import VlkitError

__all__ = [
    "find_config",
    "list_recipes",
    "recipe_description",
    "recipe_dirs",
    "recipe_path",
    "recipe_text",
]

SUFFIX = ".yaml"


def recipe_dirs() -> list[Path]:
    """The directories searched for recipes, in order, whether or not they exist."""
    return [Path(vlkit.__file__).resolve().parent / "configs"]


def _recipes() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for folder in recipe_dirs():
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob(f"*{SUFFIX}")):
            if path.is_file():
                found.setdefault(path.stem, path)
    return found


def list_recipes() -> list[str]:
    """Names of the shipped recipes (file names without ``.yaml``), sorted."""
    return sorted(_recipes())


def recipe_path(name: str) -> Path:
    """The file of a shipped recipe.

    Args:
        name: a recipe name such as ``"synth_clip_tiny"`` (a trailing ``.yaml`` is accepted).

    Returns:
        The path of the YAML file.

    Raises:
        VlkitError: if there is no such recipe; the message lists the available names.
    """
    key = name[: -len(SUFFIX)] if name.endswith(SUFFIX) else name
    recipes = _recipes()
    if key in recipes:
        return recipes[key]
    if not recipes:
        where = ", ".join(str(d) for d in recipe_dirs())
        raise VlkitError(f"unknown recipe {name!r}: no recipes found (looked in {where})")
    close = difflib.get_close_matches(key, list(recipes), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise VlkitError(f"unknown recipe {name!r}; {hint}available: {', '.join(sorted(recipes))}")


def recipe_text(name: str) -> str:
    """The YAML text of a shipped recipe (see :func:`recipe_path`)."""
    return recipe_path(name).read_text(encoding="utf-8")


def recipe_description(name: str) -> str:
    """The first comment line of a recipe without its ``#``, or ``""`` when it has none."""
    for line in recipe_text(name).splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            return stripped.lstrip("#").strip()
        if stripped:
            break
    return ""


def find_config(name_or_path: str | Path) -> Path:
    """A config file given either as a path or as the name of a shipped recipe.

    An existing file wins over a recipe of the same name.

    Args:
        name_or_path: ``"my/x.yaml"``, ``"my.yaml"`` or ``"synth_clip_tiny"``.

    Returns:
        The path of the YAML file.

    Raises:
        VlkitError: if it is neither an existing file nor a recipe name.
    """
    path = Path(name_or_path)
    text = str(name_or_path)
    if path.is_file():
        return path
    if path.exists():
        raise VlkitError(f"config path is not a file: {text}")
    if "/" in text or "\\" in text:
        raise VlkitError(f"config file not found: {text}")
    try:
        return recipe_path(text)
    except VlkitError as exc:
        raise VlkitError(f"no config file {text!r} here, and no recipe of that name: {exc}") from None
