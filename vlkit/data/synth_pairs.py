"""Synthetic NLVR2: pairs of shapes images with a sentence about both that is true or false of them.

Each pair is two images of :mod:`vlkit.data.synth` (one to three coloured shapes each) and one sentence, e.g.
``"the left image has a red circle"``, ``"both images contain a triangle"``, ``"the left image has a square
and the right image has a blue object"`` or ``"the right image has more shapes than the left image"``. Its
label is drawn first, then the sentence, then the scenes until the sentence has that label: half the pairs are
true, and a sentence is as likely under either label, so neither always answering one way nor reading the text
alone scores above 50%.

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
from dataclasses import dataclass
from typing import Callable, Sequence

from vlkit.data.synth import (_BACKGROUNDS, COLORS, IMAGE_FORMATS, JSONL_NAME, SHAPES, _a, _check_args,
                              _make_example, _place_objects, synthetic_folder, write_image, write_lines)
from vlkit.errors import VlkitError

#: the kinds of sentence, each drawn equally often: ``color`` ("the left image has a red object"), ``shape``
#: ("the right image has a triangle", "... a blue square"), ``both`` ("both images contain a circle"), ``and``
#: ("the left image has a square and the right image has a green object"), ``count`` ("the left image has more
#: shapes than the right image", "the two images have the same number of shapes"), ``background`` ("the right
#: image has a dark grey background", "both images have a beige background")
SENTENCE_KINDS = ("color", "shape", "both", "and", "count", "background")
_SIDES = ("left", "right")
_MAX_SCENES = 400  # scenes drawn for one sentence before another sentence is drawn



@dataclass(frozen=True)
class Scene:
    """What one image of a pair shows: its background and its shapes (``vlkit.data.synth`` objects)."""

    background: str
    objects: list


Predicate = Callable[[Scene, Scene], bool]


def scene(key: str, index: int, image_size: int) -> Scene:
    """The scene of shapes example ``index`` of ``key``: the draws :func:`vlkit.data.synth._make_example` makes
    first, repeated with the same seed (so the image it draws shows this scene)."""
    rng = random.Random(f"vlkit-synth:{key}:{index}")
    background = rng.choice(sorted(_BACKGROUNDS))
    return Scene(background, _place_objects(rng, image_size))


def _thing(rng: random.Random, kinds: Sequence[str] = ("shape", "color")) -> tuple[str, Callable[[object], bool]]:
    """Something an image may have: a shape, a colour (``red object``) or a coloured shape (``both``)."""
    kind, shape, color = rng.choice(kinds), rng.choice(SHAPES), rng.choice(list(COLORS))
    if kind == "shape":
        return shape, lambda o: o.shape == shape
    if kind == "color":
        return f"{color} object", lambda o: o.color == color
    return f"{color} {shape}", lambda o: o.shape == shape and o.color == color


def _has(view: Scene, test: Callable[[object], bool]) -> bool:
    return any(test(o) for o in view.objects)


def _sentence(rng: random.Random, kinds: Sequence[str]) -> tuple[str, Predicate]:
    """A sentence of one of ``kinds`` about a pair, and the predicate of (left objects, right objects) that
    makes it true."""
    kind = rng.choice(kinds)
    if kind in ("color", "shape"):
        side = rng.choice(_SIDES)
        name, test = _thing(rng, ("color",) if kind == "color" else ("shape", "both"))
        return f"the {side} image has {_a(name)}", lambda l, r: _has(l if side == "left" else r, test)
    if kind == "background":
        background = rng.choice(sorted(_BACKGROUNDS))
        if rng.random() < 0.5:
            return (f"both images have a {background} background",
                    lambda l, r: l.background == background and r.background == background)
        side = rng.choice(_SIDES)
        return (f"the {side} image has a {background} background",
                lambda l, r: (l if side == "left" else r).background == background)
    if kind == "both":
        name, test = _thing(rng)
        return f"both images contain {_a(name)}", lambda l, r: _has(l, test) and _has(r, test)
    if kind == "and":
        (name1, test1), (name2, test2) = _thing(rng), _thing(rng)
        return (f"the left image has {_a(name1)} and the right image has {_a(name2)}",
                lambda l, r: _has(l, test1) and _has(r, test2))
    if rng.random() < 0.5:
        more = rng.choice(_SIDES)
        other = "right" if more == "left" else "left"
        return (f"the {more} image has more shapes than the {other} image",
                lambda l, r: len(l.objects) > len(r.objects) if more == "left" else len(r.objects) > len(l.objects))
    return "the two images have the same number of shapes", lambda l, r: len(l.objects) == len(r.objects)


def pair_example(seed: int, index: int, image_size: int,
                 kinds: Sequence[str] = SENTENCE_KINDS) -> tuple[object, object, dict]:
    """Pair ``index`` of ``seed``: the left and right images and its NLVR2 record (without image paths).

    The label is drawn first (true or false, even odds), then a sentence, then pairs of scenes until one makes
    the sentence have that label: every sentence is as likely under either label, so the text alone tells
    nothing and the images must be looked at (as NLVR2 pairs each sentence with true and false image pairs).
    """
    rng = random.Random(f"vlkit-synth-pairs:{seed}:{index}")
    want = rng.random() < 0.5
    key = f"pairs:{seed}:{index}"
    for attempt in range(10 * _MAX_SCENES):
        if attempt % _MAX_SCENES == 0:
            sentence, true_of = _sentence(rng, kinds)
        left, right = scene(key, 2 * attempt, image_size), scene(key, 2 * attempt + 1, image_size)
        if true_of(left, right) == want:
            break
    else:  # not reached with these sentences: each has both labels within a few hundred scenes
        raise VlkitError(f"synthetic pair {index}: no scene found for its sentence")
    left_image, _ = _make_example(key, 2 * attempt, image_size)  # type: ignore[arg-type]
    right_image, _ = _make_example(key, 2 * attempt + 1, image_size)  # type: ignore[arg-type]
    record = {"identifier": f"synth-{index:06d}-0-0", "sentence": sentence, "label": "True" if want else "False"}
    return left_image, right_image, record


def generate_pairs(out_dir: str | Path, n: int, seed: int = 0, image_size: int = 64, image_format: str = "png",
                   kinds: Sequence[str] = SENTENCE_KINDS) -> Path:
    """Write ``n`` synthetic NLVR2 pairs (see the module docstring) and their JSONL.

    Args:
        out_dir: folder to write into: absent, empty, or an earlier synthetic dataset.
        n: number of pairs, at least 1.
        seed: seed of every random choice.
        image_size: side of the square images (32 to 1024).
        image_format: ``png`` or ``jpeg``.
        kinds: the kinds of sentence drawn (:data:`SENTENCE_KINDS`; default all).

    Returns:
        The path of ``out_dir/synth.jsonl``.

    Raises:
        VlkitError: an argument out of range, a folder vlkit did not write, or a failed write.
    """
    _check_args(n, seed, image_size, image_format)
    unknown = [k for k in kinds if k not in SENTENCE_KINDS]
    if unknown or not kinds:
        what = f"unknown sentence kinds {', '.join(unknown)}" if unknown else "no sentence kinds given"
        raise VlkitError(f"{what}; choose from {', '.join(SENTENCE_KINDS)}")
    ext = IMAGE_FORMATS[image_format]
    with synthetic_folder(out_dir) as out:
        lines = []
        for i in range(n):
            left, right, record = pair_example(seed, i, image_size, kinds)
            stem = record["identifier"].rsplit("-", 1)[0]
            write_image(out / "images" / f"{stem}-img0.{ext}", left, image_format)
            write_image(out / "images" / f"{stem}-img1.{ext}", right, image_format)
            lines.append(json.dumps(record, ensure_ascii=False))
        return write_lines(out / JSONL_NAME, lines)
