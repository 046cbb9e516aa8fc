"""Helpers shared by the readers: locating images, checking text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from vlkit.data.records import Problem
from vlkit.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def images_root_for(source: Path, images_root: Path | None, first_name: str | None) -> Path:
    """The folder image paths of ``source`` are relative to.

    An explicit ``images_root`` wins; otherwise the source's folder, or its ``images/`` subfolder when the
    first image named by the source lies there.
    """
    if images_root is not None:
        if not images_root.is_dir():
            raise DataError(f"--images-root {images_root}: not a directory")
        return images_root
    base = source.parent
    if first_name and not (base / first_name).exists() and (base / "images" / first_name).exists():
        return base / "images"
    return base


def confinement_root(source: Path, images_root: Path | None) -> Path:
    """The folder every image named by ``source`` must lie in: ``images_root``, else the source's folder."""
    return images_root if images_root is not None else source.parent


def image_id(path: Path, root: Path) -> str:
    """The stable id of an image: its path relative to the images root, with forward slashes."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def bad_text(text: Any) -> str | None:
    """Why ``text`` cannot be a caption/question, or None when it is fine."""
    if not isinstance(text, str):
        return f"text is {type(text).__name__}, not a string"
    if any("\udc80" <= ch <= "\udcff" for ch in text) or "\ufffd" in text:
        return "undecodable text (not valid UTF-8)"
    if not text.strip():
        return "empty caption"
    return None


def load_json(path: Path) -> Any:
    """Parse a whole JSON file, or raise one clear DataError naming it."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None


def json_lines(path: Path, problems: list[Problem]) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed object)`` for each non-blank line of a JSON-lines file; a line that is not UTF-8
    or not JSON is reported in ``problems`` (naming the file and line) and skipped."""
    with open(path, "rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                problems.append(Problem(str(path), line_no, "undecodable text (not valid UTF-8)"))
                continue
            except json.JSONDecodeError as exc:
                problems.append(Problem(str(path), line_no, f"invalid JSON ({exc.msg})"))
                continue
            yield line_no, obj
