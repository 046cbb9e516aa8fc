"""Tests for the synthetic coloured-shapes dataset.

The content checks read the objects back from the PIXELS, independently of the generator: shapes are
filled with the exact COLORS values, so each object is an 8-connected blob of one exact colour, and its
shape follows from how much of its bounding box it fills (square 1.0, circle ~0.79, triangle ~0.5).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlkit.data.synth import CLASSES, COLORS, SHAPES, generate
from vlkit.errors import VlkitError

COLOR_RE = "|".join(COLORS)
SHAPE_RE = "|".join(SHAPES)
NAME_RE = rf"(?:{COLOR_RE}) (?:{SHAPE_RE})"
RELATION_RE = re.compile(
    rf"^an? ({NAME_RE}) (?:is |placed )?(above|below|to the left of|to the right of) an? ({NAME_RE})$"
)
COUNT_WORDS = {"one": 1, "single": 1, "two": 2, "three": 3}


@dataclass
class Blob:
    color: str
    shape: str
    area: int
    cx: float
    cy: float

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


# ---------------------------------------------------------------------------------------------------
# Reading objects back from pixels
# ---------------------------------------------------------------------------------------------------


def _components(mask: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """8-connected components of a boolean mask, as (ys, xs) arrays."""
    seen = np.zeros_like(mask)
    h, w = mask.shape
    found = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        stack, ys, xs = [(y0, x0)], [], []
        while stack:
            y, x = stack.pop()
            ys.append(y)
            xs.append(x)
            for ny in (y - 1, y, y + 1):
                for nx in (x - 1, x, x + 1):
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
        found.append((np.array(ys), np.array(xs)))
    return found


def _classify(ys: np.ndarray, xs: np.ndarray) -> str:
    width, height = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    fill = len(ys) / (width * height)
    if fill > 0.95:
        return "square"
    return "circle" if fill > 0.625 else "triangle"


def _blobs(pixels: np.ndarray) -> list[Blob]:
    blobs = []
    for color, rgb in COLORS.items():
        for ys, xs in _components(np.all(pixels == rgb, axis=-1)):
            blobs.append(Blob(color, _classify(ys, xs), len(ys), float(xs.mean()), float(ys.mean())))
    return blobs


def _load(jsonl: Path) -> list[dict]:
    return [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]


def _pixels(root: Path, rec: dict) -> np.ndarray:
    with Image.open(root / rec["image"]) as img:
        return np.asarray(img.convert("RGB"))


# ---------------------------------------------------------------------------------------------------
# Checking texts against the pixels
# ---------------------------------------------------------------------------------------------------


def _direction(dx: float, dy: float) -> str:
    """The dominant axis of an offset (x right, y down): "right", "left", "down" or "up"."""
    if abs(dy) > abs(dx):
        return "down" if dy > 0 else "up"
    return "right" if dx > 0 else "left"


def _holds(a: Blob, relation: str, b: Blob) -> bool:
    """Whether "a <relation> b" is true of the pixel centroids."""
    wanted = {"above": "down", "below": "up", "to the left of": "right", "to the right of": "left"}
    return _direction(b.cx - a.cx, b.cy - a.cy) == wanted[relation]


def _check_background(pixels: np.ndarray, blobs_mask: np.ndarray, name: str) -> None:
    r, g, b = np.median(pixels[~blobs_mask], axis=0)
    seen = f"caption says {name!r}, background median is {(r, g, b)}"
    if name == "light grey":
        assert min(r, g, b) > 150 and max(r, g, b) - min(r, g, b) < 15, seen
    elif name == "dark grey":
        assert max(r, g, b) < 110 and max(r, g, b) - min(r, g, b) < 15, seen
    else:
        assert name == "beige" and r > g > b and r > 180, seen


def _check_caption(caption: str, by_name: dict[str, Blob], pixels: np.ndarray) -> None:
    names = re.findall(NAME_RE, caption)
    assert names or re.search(r"\b(two|three) coloured shapes\b", caption), caption
    for name in names:
        assert name in by_name, f"{caption!r} names {name!r}, not in the image {sorted(by_name)}"
    for color in re.findall(rf"\b({COLOR_RE})\b", caption):
        assert any(b.color == color for b in by_name.values()), caption
    if any(word in caption for word in ("left", "right", "above", "below")):
        match = RELATION_RE.match(caption)
        assert match, f"spatial word outside a relation caption: {caption!r}"
        a, rel, b = by_name[match.group(1)], match.group(2), by_name[match.group(3)]
        assert _holds(a, rel, b), (caption, a, b)
    for word, number in COUNT_WORDS.items():
        if re.search(rf"\b{word}\b", caption):
            assert len(by_name) == number, caption
    if caption.startswith("the largest shape is"):
        assert max(by_name.values(), key=lambda b: b.area).name == names[0]
    if caption.startswith("a large "):
        assert by_name[names[0]].area > by_name[names[1]].area
    if caption.endswith(" background"):
        mask = np.zeros(pixels.shape[:2], dtype=bool)
        for rgb in COLORS.values():
            mask |= np.all(pixels == rgb, axis=-1)
        _check_background(pixels, mask, caption.split(" on a ")[-1][: -len(" background")])


def _check_question(question: str, answer: str, blobs: list[Blob], size: int) -> None:
    by_name = {b.name: b for b in blobs}
    if question.startswith("how many"):
        assert answer == str(len(blobs))
    elif m := re.fullmatch(rf"what color is the ({SHAPE_RE})\?", question):
        having = [b for b in blobs if b.shape == m.group(1)]
        assert len(having) == 1 and having[0].color == answer, question
    elif m := re.fullmatch(rf"what shape is the ({COLOR_RE}) object\?", question):
        having = [b for b in blobs if b.color == m.group(1)]
        assert len(having) == 1 and having[0].shape == answer, question
    elif m := re.fullmatch(rf"where is the ({NAME_RE})\?", question):
        o, centre = by_name[m.group(1)], (size - 1) / 2
        side = {"down": "bottom", "up": "top", "right": "right", "left": "left"}
        assert side[_direction(o.cx - centre, o.cy - centre)] == answer, question
    elif m := re.fullmatch(rf"is the ({NAME_RE}) (.+) the ({NAME_RE})\?", question):
        truth = _holds(by_name[m.group(1)], m.group(2), by_name[m.group(3)])
        assert answer == ("yes" if truth else "no"), question
    else:
        pytest.fail(f"unexpected question {question!r}")


def _check_record(root: Path, rec: dict, size: int) -> None:
    pixels = _pixels(root, rec)
    assert pixels.shape == (size, size, 3)
    blobs = _blobs(pixels)
    by_name = {b.name: b for b in blobs}
    assert len(by_name) == len(blobs) == rec["count"], (rec, blobs)
    largest = sorted(blobs, key=lambda b: -b.area)
    assert largest[0].name == rec["class_name"]
    assert len(largest) == 1 or largest[0].area > largest[1].area
    for caption in rec["text"]:
        _check_caption(caption, by_name, pixels)
    for question, answers in zip(rec["questions"], rec["answers"]):
        _check_question(question, answers[0], blobs, size)


# ---------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------


def test_public_constants():
    assert list(COLORS) == ["red", "green", "blue", "yellow", "purple", "orange"]
    assert SHAPES == ("circle", "square", "triangle")
    assert len(CLASSES) == 18 and len(set(CLASSES)) == 18
    assert {f"{c} {s}" for c in COLORS for s in SHAPES} == set(CLASSES)
    values = list(COLORS.values())
    for i, a in enumerate(values):
        for b in values[i + 1 :]:
            assert sum(abs(x - y) for x, y in zip(a, b)) > 100


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = generate(tmp_path / "a", 10, seed=7)
    b = generate(tmp_path / "b", 10, seed=7)
    c = generate(tmp_path / "c", 10, seed=8)
    assert a.name == "synth.jsonl" and a.parent == tmp_path / "a"
    assert a.read_bytes() == b.read_bytes()
    for rec in _load(a):
        assert (a.parent / rec["image"]).read_bytes() == (b.parent / rec["image"]).read_bytes()
    assert a.read_bytes() != c.read_bytes()
    images_a = [(a.parent / r["image"]).read_bytes() for r in _load(a)]
    images_c = [(c.parent / r["image"]).read_bytes() for r in _load(c)]
    assert images_a != images_c


def test_jpeg_is_deterministic(tmp_path):
    a = generate(tmp_path / "a", 4, seed=1, image_format="jpeg")
    b = generate(tmp_path / "b", 4, seed=1, image_format="jpeg")
    assert a.read_bytes() == b.read_bytes()
    for rec in _load(a):
        assert (a.parent / rec["image"]).read_bytes() == (b.parent / rec["image"]).read_bytes()


def test_smaller_n_is_a_prefix(tmp_path):
    small = _load(generate(tmp_path / "s", 3, seed=2))
    large = _load(generate(tmp_path / "l", 6, seed=2))
    assert large[:3] == small


def test_record_fields(tmp_path):
    jsonl = generate(tmp_path, 30, seed=0)
    records = _load(jsonl)
    assert len(records) == 30
    counts = set()
    for i, rec in enumerate(records):
        assert list(rec) == ["image", "text", "label", "class_name", "questions", "answers", "count"]
        assert rec["image"] == f"images/{i:06d}.png"
        assert (tmp_path / rec["image"]).is_file()
        assert 2 <= len(rec["text"]) <= 5 and all(isinstance(t, str) and t for t in rec["text"])
        assert len(set(rec["text"])) == len(rec["text"])
        assert 2 <= len(rec["questions"]) <= 4 and len(rec["answers"]) == len(rec["questions"])
        assert all(isinstance(a, list) and len(a) == 1 and isinstance(a[0], str) for a in rec["answers"])
        assert rec["class_name"] in CLASSES and rec["label"] == CLASSES.index(rec["class_name"])
        assert rec["class_name"] in rec["text"][0]
        assert rec["count"] in (1, 2, 3)
        counts.add(rec["count"])
    assert counts == {1, 2, 3}
    from vlkit.utils.fs import MARKER_NAME

    assert (tmp_path / MARKER_NAME).is_file()  # the folder is marked as vlkit's own synthetic dataset
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".") and p.name != MARKER_NAME], \
        "temporary files left"


@pytest.mark.parametrize("size,n,seed", [(64, 80, 3), (32, 25, 4), (128, 15, 5)])
def test_texts_match_pixels(tmp_path, size, n, seed):
    jsonl = generate(tmp_path, n, seed=seed, image_size=size)
    records = _load(jsonl)
    for rec in records:
        _check_record(tmp_path, rec, size)
    # the checks above must have had relations and every kind of question to look at
    texts = " | ".join(t for rec in records for t in rec["text"] + rec["questions"])
    if size == 64:
        for phrase in ("above", "below", "left of", "right of", "where is", "what color", "what shape"):
            assert phrase in texts


def test_jpeg_images_roughly_show_the_label(tmp_path):
    jsonl = generate(tmp_path, 8, seed=9, image_format="jpeg")
    for rec in _load(jsonl):
        assert rec["image"].endswith(".jpg")
        with Image.open(tmp_path / rec["image"]) as img:
            assert img.format == "JPEG" and img.size == (64, 64)
            pixels = np.asarray(img.convert("RGB")).astype(int)
        rgb = np.array(COLORS[rec["class_name"].split()[0]])
        near = np.abs(pixels - rgb).sum(axis=-1) < 60
        assert near.sum() > 50, rec


@pytest.mark.parametrize(
    "kwargs,words",
    [
        ({"n": 0}, "n must be"),
        ({"n": -3}, "n must be"),
        ({"n": 2, "image_format": "gif"}, "image_format 'gif'"),
        ({"n": 2, "image_format": "webp"}, "'png', 'jpeg'"),
        ({"n": 2, "image_size": 8}, "image_size"),
    ],
)
def test_bad_arguments_raise_vlkit_error(tmp_path, kwargs, words):
    with pytest.raises(VlkitError, match=re.escape(words)):
        generate(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()
