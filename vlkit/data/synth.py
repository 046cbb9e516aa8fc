"""A deterministic synthetic image-text dataset of coloured shapes, for fast end-to-end tests.

Every image shows one to three filled shapes (circle, square, triangle) in six well-separated colours
on a plain, lightly noisy background. The captions, the class label and the question-answer pairs are
all derived from what was drawn, so a small model can learn contrastive retrieval, zero-shot
classification and VQA from a few hundred images in seconds.

Layout of the output::

    out_dir/
        images/000000.png ...   # or .jpg
        synth.jsonl             # one JSON object per image, image paths relative to out_dir

Each JSONL line::

    {"image": "images/000000.png", "text": [...], "label": 3, "class_name": "green circle",
     "questions": [...], "answers": [["red"], ...], "count": 2}

Guarantees the tests rely on:

* Shapes are filled with the exact RGB values of :data:`COLORS` (no anti-aliasing) and only the
  background carries noise, so in PNG images every object is recoverable from its pixels.
* Objects never overlap and are at least two pixels apart, so each is one separate blob.
* No two objects in an image share both colour and shape, so "the red circle" always names one object.
* The first object has strictly the largest pixel area; ``label``/``class_name`` name it.
* Spatial words (above, below, left, right, top, bottom) are used only where the separation between
  pixel centroids is clear: the dominant axis is at least 1.5 times the other and at least 1/8 of the
  image wide.
* The output depends only on ``(n, seed, image_size, image_format)``; image ``i`` depends only on
  ``(seed, i, image_size, image_format)``, so a smaller ``n`` gives a prefix of a larger one.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

from vlkit.errors import VlkitError

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 225, 40),
    "purple": (140, 40, 180),
    "orange": (245, 125, 10),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
CLASSES: list[str] = [f"{color} {shape}" for color in COLORS for shape in SHAPES]

IMAGE_FORMATS = {"png": "png", "jpeg": "jpg"}
JSONL_NAME = "synth.jsonl"
MIN_IMAGE_SIZE = 32
MAX_IMAGE_SIZE = 1024

_BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "light grey": (200, 200, 200),
    "dark grey": (70, 70, 70),
    "beige": (225, 210, 180),
}
_NOISE = 6  # background noise amplitude, in grey levels either side
_MAX_OBJECTS = 3
_PLACEMENT_TRIES = 200
_AREA_RATIO = 0.7  # every other object has at most this fraction of the first object's pixel area
_CLEAR_RATIO = 1.5  # the dominant axis must exceed the other by this factor
_COUNT_WORDS = {1: "one", 2: "two", 3: "three"}


@dataclass(frozen=True)
class _Object:
    """One drawn shape: its identity, where its box is, and measurements of its actual pixels."""

    color: str
    shape: str
    x0: int
    y0: int
    size: int
    area: int
    cx: float
    cy: float

    @property
    def name(self) -> str:
        """The colour and shape, e.g. ``"red circle"``."""
        return f"{self.color} {self.shape}"


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------


def generate(
    out_dir: str | Path, n: int, seed: int = 0, image_size: int = 64, image_format: str = "png"
) -> Path:
    """Write a synthetic coloured-shapes dataset and its JSONL manifest.

    Every file is written under a temporary name and renamed into place, and the JSONL is written last,
    so a run that is interrupted never leaves a half-written manifest.

    Args:
        out_dir: Folder to write into: absent (it is created), empty, or an earlier synthetic dataset.
        n: Number of images, at least 1.
        seed: Seed for all randomness; the same arguments always give byte-identical files.
        image_size: Width and height of the square images, in pixels (32 to 1024).
        image_format: ``"png"`` (exact colours) or ``"jpeg"`` (files named ``.jpg``).

    Returns:
        The path of ``out_dir/synth.jsonl``.

    Raises:
        VlkitError: An argument is out of range, the folder holds files vlkit did not write, or the files
            cannot be written.
    """
    _check_args(n, seed, image_size, image_format)
    ext = IMAGE_FORMATS[image_format]
    with synthetic_folder(out_dir) as out:
        lines = []
        for i in range(n):
            rel = f"images/{i:06d}.{ext}"
            image, record = _make_example(seed, i, image_size)
            write_image(out / rel, image, image_format)
            lines.append(json.dumps({"image": rel, **record}, ensure_ascii=False))
        return write_lines(out / JSONL_NAME, lines)


def _check_args(n: int, seed: int, image_size: int, image_format: str) -> None:
    """Raise VlkitError for any argument that generate() cannot honour."""
    if not _is_int(n) or n < 1:
        raise VlkitError(f"synthetic dataset size n must be an integer >= 1, got {n!r}")
    if not _is_int(seed):
        raise VlkitError(f"synthetic dataset seed must be an integer, got {seed!r}")
    if not _is_int(image_size) or not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise VlkitError(
            f"synthetic image_size must be an integer from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE}, "
            f"got {image_size!r}"
        )
    if image_format not in IMAGE_FORMATS:
        raise VlkitError(
            f"unsupported synthetic image_format {image_format!r}; use one of "
            + ", ".join(repr(f) for f in IMAGE_FORMATS)
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write bytes to a temporary sibling, then rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def synthetic_folder(out_dir: str | Path) -> Iterator[Path]:
    """The folder a generator writes into: checked first (absent, empty or an earlier synthetic dataset, never a
    folder of the user's files), with its ``images/`` folder and vlkit's marker; a failed write becomes one
    :class:`~vlkit.errors.VlkitError` naming the folder."""
    from vlkit.utils.fs import check_output_dir, write_marker

    out = Path(out_dir)
    check_output_dir(out, "synth")
    try:
        (out / "images").mkdir(parents=True, exist_ok=True)
        write_marker(out, "synth")
        yield out
    except OSError as exc:
        raise VlkitError(f"cannot write synthetic dataset to {out}: {exc}") from None


def write_image(path: Path, image: Image.Image, image_format: str) -> None:
    """Encode ``image`` deterministically and write it beside, then rename it into place."""
    _write_atomic(path, _encode(image, image_format))


def write_lines(path: Path, lines: list[str]) -> Path:
    """Write a manifest of one line per entry (last, so an interrupted run never leaves half a manifest)."""
    _write_atomic(path, ("\n".join(lines) + "\n").encode("utf-8"))
    return path


def _encode(image: Image.Image, image_format: str) -> bytes:
    """Encode deterministically: no timestamps, fixed JPEG quality without chroma subsampling."""
    buf = io.BytesIO()
    if image_format == "png":
        image.save(buf, format="PNG", optimize=False)
    else:
        image.save(buf, format="JPEG", quality=95, subsampling=0)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------
# One example: scene, image, texts
# --------------------------------------------------------------------------------------------------


def _make_example(seed: int, index: int, image_size: int) -> tuple[Image.Image, dict]:
    """Build image ``index`` and its record (everything but the image path)."""
    rng = random.Random(f"vlkit-synth:{seed}:{index}")
    background = rng.choice(sorted(_BACKGROUNDS))
    objects = _place_objects(rng, image_size)
    image = _render(objects, background, image_size, np.random.default_rng(rng.getrandbits(64)))
    captions = _captions(rng, objects, background, image_size)
    questions, answers = _questions(rng, objects, image_size)
    main = objects[0]
    record = {
        "text": captions,
        "label": CLASSES.index(main.name),
        "class_name": main.name,
        "questions": questions,
        "answers": answers,
        "count": len(objects),
    }
    return image, record


def _size_range(image_size: int) -> tuple[int, int]:
    """Smallest and largest object box side: 14 to 24 px at 64 px, scaled with the image."""
    return max(6, round(image_size * 14 / 64)), round(image_size * 24 / 64)


def _place_objects(rng: random.Random, image_size: int) -> list[_Object]:
    """Choose 1-3 distinct, non-overlapping objects; the first is strictly the largest by area."""
    lo, hi = _size_range(image_size)
    wanted = rng.randint(1, _MAX_OBJECTS)
    first = _try_place(rng, image_size, [], rng.randint(hi - (hi - lo) // 3, hi), None)
    assert first is not None  # an empty canvas always has room
    objects = [first]
    while len(objects) < wanted:
        obj = None
        for _ in range(_PLACEMENT_TRIES):
            obj = _try_place(rng, image_size, objects, rng.randint(lo, hi), first.area)
            if obj is not None:
                break
        if obj is None:
            break  # no room: keep fewer objects
        objects.append(obj)
    return objects


def _try_place(
    rng: random.Random, image_size: int, placed: list[_Object], size: int, max_area: int | None
) -> _Object | None:
    """One random attempt at a new object; None when it clashes with what is already placed."""
    color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
    margin, gap = 1, max(2, image_size // 32)
    x0 = rng.randint(margin, image_size - size - margin)
    y0 = rng.randint(margin, image_size - size - margin)
    if any(o.color == color and o.shape == shape for o in placed):
        return None
    mask = _shape_mask(shape, size)
    area = int(mask.sum())
    if max_area is not None and area > _AREA_RATIO * max_area:
        return None
    for o in placed:
        apart_x = x0 >= o.x0 + o.size + gap or o.x0 >= x0 + size + gap
        apart_y = y0 >= o.y0 + o.size + gap or o.y0 >= y0 + size + gap
        if not (apart_x or apart_y):
            return None
    ys, xs = np.nonzero(mask)
    return _Object(color, shape, x0, y0, size, area, x0 + float(xs.mean()), y0 + float(ys.mean()))


def _shape_mask(shape: str, size: int) -> np.ndarray:
    """A ``size`` x ``size`` boolean mask of the filled shape, drawn without anti-aliasing."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    last = size - 1
    if shape == "circle":
        draw.ellipse((0, 0, last, last), fill=255)
    elif shape == "square":
        draw.rectangle((0, 0, last, last), fill=255)
    else:  # triangle, apex up
        draw.polygon([(last / 2, 0), (last, last), (0, last)], fill=255)
    return np.asarray(canvas) > 0


def _render(
    objects: list[_Object], background: str, image_size: int, noise_rng: np.random.Generator
) -> Image.Image:
    """Paint a noisy background, then each object's mask in its exact colour."""
    base = np.array(_BACKGROUNDS[background], dtype=np.int16)
    noise = noise_rng.integers(-_NOISE, _NOISE + 1, size=(image_size, image_size, 1), dtype=np.int16)
    pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
    for o in objects:
        window = pixels[o.y0 : o.y0 + o.size, o.x0 : o.x0 + o.size]
        window[_shape_mask(o.shape, o.size)] = COLORS[o.color]
    return Image.fromarray(pixels, mode="RGB")


# --------------------------------------------------------------------------------------------------
# Spatial relations
# --------------------------------------------------------------------------------------------------


def _dominant(dx: float, dy: float, min_sep: float) -> str | None:
    """Direction of an offset (x right, y down) when one axis clearly dominates, else None.

    Returns one of ``"down"``, ``"up"``, ``"right"``, ``"left"``.
    """
    if abs(dy) >= _CLEAR_RATIO * abs(dx) and abs(dy) >= min_sep:
        return "down" if dy > 0 else "up"
    if abs(dx) >= _CLEAR_RATIO * abs(dy) and abs(dx) >= min_sep:
        return "right" if dx > 0 else "left"
    return None


_RELATION = {"down": "above", "up": "below", "right": "to the left of", "left": "to the right of"}
_INVERSE = {
    "above": "below",
    "below": "above",
    "to the left of": "to the right of",
    "to the right of": "to the left of",
}
_WHERE = {"down": "bottom", "up": "top", "right": "right", "left": "left"}


def _relation(a: _Object, b: _Object, image_size: int) -> str | None:
    """How ``a`` sits relative to ``b`` ("above", "to the left of", ...), or None if unclear."""
    direction = _dominant(b.cx - a.cx, b.cy - a.cy, image_size / 8)
    return None if direction is None else _RELATION[direction]


def _where(o: _Object, image_size: int) -> str | None:
    """Which side of the image the object is on ("top", "bottom", "left", "right"), or None."""
    centre = (image_size - 1) / 2
    direction = _dominant(o.cx - centre, o.cy - centre, image_size / 8)
    return None if direction is None else _WHERE[direction]


def _clear_pairs(objects: list[_Object], image_size: int) -> list[tuple[_Object, str, _Object]]:
    """Every unordered pair of objects with a clear relation, as (a, relation, b)."""
    pairs = []
    for i, a in enumerate(objects):
        for b in objects[i + 1 :]:
            rel = _relation(a, b, image_size)
            if rel is not None:
                pairs.append((a, rel, b))
    return pairs


# --------------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------------


def _a(name: str) -> str:
    """The name with its indefinite article: "a red circle", "an orange square"."""
    return ("an " if name[0] in "aeiou" else "a ") + name


def _listing(objects: list[_Object]) -> str:
    """ "a red circle", "a red circle and a blue square", "a, b and c"."""
    names = [_a(o.name) for o in objects]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _captions(rng: random.Random, objects: list[_Object], background: str, image_size: int) -> list[str]:
    """Two to five true captions; the first always names the largest object."""
    main = _a(objects[0].name)
    first = rng.choice([main, f"a picture of {main}", f"an image of {main}", f"a drawing of {main}"])
    pool = [
        f"{rng.choice([main, _listing(objects)])} on a {background} background",
        _inventory_caption(rng, objects),
    ]
    if len(objects) == 1:
        pool.append(rng.choice([f"{main} alone", f"just {main}, nothing else"]))
    else:
        pool.append(f"the largest shape is {main}")
    if len(objects) == 2:
        pool.append(f"a large {objects[0].name} and a small {objects[1].name}")
    for a, rel, b in _clear_pairs(objects, image_size):
        if rng.random() < 0.5:
            a, rel, b = b, _INVERSE[rel], a
        verb = rng.choice(["", "is ", "placed "])
        pool.append(f"{_a(a.name)} {verb}{rel} {_a(b.name)}")
    rng.shuffle(pool)
    return [first] + pool[: rng.randint(1, min(4, len(pool)))]


def _inventory_caption(rng: random.Random, objects: list[_Object]) -> str:
    """A caption that states how many shapes there are."""
    if len(objects) == 1:
        return rng.choice([f"a single {objects[0].name}", f"one shape: {_a(objects[0].name)}"])
    word = _COUNT_WORDS[len(objects)]
    return rng.choice([f"{word} shapes: {_listing(objects)}", f"{word} coloured shapes"])


# --------------------------------------------------------------------------------------------------
# Questions
# --------------------------------------------------------------------------------------------------


def _questions(
    rng: random.Random, objects: list[_Object], image_size: int
) -> tuple[list[str], list[list[str]]]:
    """Two to four unambiguous questions, each with one answer."""
    count_q = rng.choice(["how many shapes are there?", "how many objects are in the image?"])
    pool = [(count_q, str(len(objects)))]
    for shape in SHAPES:
        having = [o for o in objects if o.shape == shape]
        if len(having) == 1:
            pool.append((f"what color is the {shape}?", having[0].color))
    for color in COLORS:
        having = [o for o in objects if o.color == color]
        if len(having) == 1:
            pool.append((f"what shape is the {color} object?", having[0].shape))
    for o in objects:
        side = _where(o, image_size)
        if side is not None:
            pool.append((f"where is the {o.name}?", side))
    for a, rel, b in _clear_pairs(objects, image_size):
        pool.append(_yes_no(rng, a, rel, b))
    rng.shuffle(pool)
    chosen = pool[: rng.randint(2, min(4, len(pool)))]
    return [q for q, _ in chosen], [[ans] for _, ans in chosen]


def _yes_no(rng: random.Random, a: _Object, rel: str, b: _Object) -> tuple[str, str]:
    """Ask about a clear relation, true or flipped (never about the other axis, which may be unclear)."""
    if rng.random() < 0.5:
        a, rel, b = b, _INVERSE[rel], a  # the same fact, stated the other way round
    answer = "yes"
    if rng.random() < 0.5:
        rel, answer = _INVERSE[rel], "no"
    return f"is the {a.name} {rel} the {b.name}?", answer
