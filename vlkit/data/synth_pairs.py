"""Synthetic NLVR2: pairs of shapes images with a sentence about both that is true or false of them.

Each pair is two images of :mod:`vlkit.data.synth` (one to three coloured shapes each) and one sentence, e.g.
``"the left image has a red circle"``, ``"both images contain a triangle"``, ``"the left image has a square
and the right image has a blue object"`` or ``"the right image has more shapes than the left image"``. Its
label is computed from the shapes drawn; half the pairs, drawn at random, get a true sentence and the others a
false one, so always answering one way scores 50%.

Written as NLVR2 releases its data, so that :mod:`vlkit.data.readers.nlvr2` reads it::

    out_dir/
        images/synth-000000-0-img0.png, images/synth-000000-0-img1.png ...   # left, right
        synth.jsonl    # {"identifier": "synth-000000-0-0", "sentence": ..., "label": "True" or "False"}

The output depends only on the arguments (temporary names renamed into place, the JSONL last).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

from vlkit.data.synth import (COLORS, IMAGE_FORMATS, JSONL_NAME, SHAPES, _a, _check_args, _encode, _make_example,
                              _write_atomic)
from vlkit.errors import VlkitError

#: the kinds of sentence, each drawn equally often
SENTENCE_KINDS = ("one_side", "both", "and", "count")
_SIDES = ("left", "right")
_MAX_TRIES = 50


def _things() -> list[tuple[str, Callable[[object], bool]]]:
    """What a sentence may say an image has: a shape, a colour and shape, or a colour (``red object``)."""
    out: list[tuple[str, Callable[[object], bool]]] = []
    for shape in SHAPES:
        out.append((shape, lambda o, s=shape: o.shape == s))
        for color in COLORS:
            out.append((f"{color} {shape}", lambda o, s=shape, c=color: o.shape == s and o.color == c))
    for color in COLORS:
        out.append((f"{color} object", lambda o, c=color: o.color == c))
    return out


def _has(objects: list, test: Callable[[object], bool]) -> bool:
    return any(test(o) for o in objects)


def _sentence(rng: random.Random, kind: str, left: list, right: list) -> tuple[str, bool]:
    """One sentence of ``kind`` about the pair and whether it is true of it."""
    sides = {"left": left, "right": right}
    things = _things()
    if kind == "one_side":
        side, (name, test) = rng.choice(_SIDES), rng.choice(things)
        return f"the {side} image has {_a(name)}", _has(sides[side], test)
    if kind == "both":
        name, test = rng.choice([t for t in things if " " not in t[0]])  # a shape: "both images contain a circle"
        return f"both images contain {_a(name)}", _has(left, test) and _has(right, test)
    if kind == "and":
        (name1, test1), (name2, test2) = rng.choice(things), rng.choice(things)
        return (f"the left image has {_a(name1)} and the right image has {_a(name2)}",
                _has(left, test1) and _has(right, test2))
    more = rng.choice(_SIDES)
    other = "right" if more == "left" else "left"
    if rng.random() < 0.5:
        return (f"the {more} image has more shapes than the {other} image",
                len(sides[more]) > len(sides[other]))
    return "the two images have the same number of shapes", len(left) == len(right)


def pair_example(seed: int, index: int, image_size: int) -> tuple[object, object, dict]:
    """Pair ``index`` of ``seed``: the left and right images and its NLVR2 record (without image paths)."""
    from vlkit.data.synth_qa import _objects

    key = f"pairs:{seed}"
    left_image, _ = _make_example(key, 2 * index, image_size)  # type: ignore[arg-type]
    right_image, _ = _make_example(key, 2 * index + 1, image_size)  # type: ignore[arg-type]
    left, right = _objects(key, 2 * index, image_size), _objects(key, 2 * index + 1, image_size)
    rng = random.Random(f"vlkit-synth-pairs:{seed}:{index}")
    want = rng.random() < 0.5
    kind = rng.choice(SENTENCE_KINDS)
    sentence, truth = _sentence(rng, kind, left, right)
    for _ in range(_MAX_TRIES):  # draw again (any kind) until the sentence has the label wanted
        if truth == want:
            break
        sentence, truth = _sentence(rng, rng.choice(SENTENCE_KINDS), left, right)
    record = {"identifier": f"synth-{index:06d}-0-0", "sentence": sentence, "label": "True" if truth else "False"}
    return left_image, right_image, record


def generate_pairs(out_dir: str | Path, n: int, seed: int = 0, image_size: int = 64,
                   image_format: str = "png") -> Path:
    """Write ``n`` synthetic NLVR2 pairs (see the module docstring) and their JSONL.

    Args:
        out_dir: folder to write into: absent, empty, or an earlier synthetic dataset.
        n: number of pairs, at least 1.
        seed: seed of every random choice.
        image_size: side of the square images (32 to 1024).
        image_format: ``png`` or ``jpeg``.

    Returns:
        The path of ``out_dir/synth.jsonl``.

    Raises:
        VlkitError: an argument out of range, a folder vlkit did not write, or a failed write.
    """
    from vlkit.utils.fs import check_output_dir, write_marker

    _check_args(n, seed, image_size, image_format)
    out = Path(out_dir)
    check_output_dir(out, "synth")
    ext = IMAGE_FORMATS[image_format]
    try:
        (out / "images").mkdir(parents=True, exist_ok=True)
        write_marker(out, "synth")
        lines = []
        for i in range(n):
            left, right, record = pair_example(seed, i, image_size)
            stem = record["identifier"].rsplit("-", 1)[0]
            _write_atomic(out / "images" / f"{stem}-img0.{ext}", _encode(left, image_format))
            _write_atomic(out / "images" / f"{stem}-img1.{ext}", _encode(right, image_format))
            lines.append(json.dumps(record, ensure_ascii=False))
        jsonl = out / JSONL_NAME
        _write_atomic(jsonl, ("\n".join(lines) + "\n").encode("utf-8"))
    except OSError as exc:
        raise VlkitError(f"cannot write synthetic dataset to {out}: {exc}") from None
    return jsonl
