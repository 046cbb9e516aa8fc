"""Synthetic visual entailment: the shapes images of :mod:`vlkit.data.synth`, each with three hypotheses, one
per SNLI-VE label, written as an SNLI-VE JSONL file (so the SNLI-VE reader ingests it).

For image ``i`` (the shapes example ``i`` of the seed, drawn exactly as ``--kind shapes`` draws it):

* entailment: a drawn object is named, ``"there is a red circle"`` (or ``"the image shows ..."``,
  ``"... is in the picture"``);
* contradiction: the same sentences about a colour and shape that no drawn object has
  (``"there is a blue square"`` when no square is blue); half of them keep a drawn shape with another colour,
  or a drawn colour with another shape, so the words alone do not give them away;
* neutral: a property the picture cannot show of a drawn object, ``"the red circle is made of wood"``.

Each line: ``Flikr30kID`` (the image path relative to the folder), ``sentence1`` (the image's first caption,
the premise), ``sentence2`` (the hypothesis), ``gold_label``, ``pairID`` (``000007#c``) and ``split``: the
image's split from a hash of its index (10% val, 10% test), the same for its three pairs, so no image is both
trained on and evaluated. The output depends only on the arguments.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from vlkit.data.synth import (COLORS, IMAGE_FORMATS, JSONL_NAME, SHAPES, _a, _check_args, _make_example,
                              synthetic_folder, write_image, write_lines)

#: the sentence frames of entailed and contradicted hypotheses; ``{}`` is "a red circle"
FRAMES = ("there is {}", "the image shows {}", "{} is in the picture")
#: properties no picture of shapes can show: the neutral hypotheses
PROPERTIES = ("made of wood", "made of glass", "heavy", "warm", "cold", "old", "brand new", "expensive",
              "fragile", "sticky")
#: the share of images held out for validation and for test
VAL_FRACTION, TEST_FRACTION = 0.1, 0.1


def entailment_pairs(seed: int, index: int, objects: list) -> list[tuple[str, str]]:
    """``(hypothesis, gold label)`` for the three labels of one image, in the order entailment, neutral,
    contradiction.

    Args:
        seed: the dataset seed.
        index: the image's index.
        objects: the drawn objects (``color``, ``shape`` attributes), the largest first.
    """
    rng = random.Random(f"vlkit-synth-entail:{seed}:{index}")
    drawn = {(o.color, o.shape) for o in objects}
    shown = rng.choice(objects)
    entailed = rng.choice(FRAMES).format(_a(f"{shown.color} {shown.shape}"))
    neutral_object = rng.choice(objects)
    neutral = f"the {neutral_object.color} {neutral_object.shape} is {rng.choice(PROPERTIES)}"
    near = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in drawn
            and any(c == o.color or s == o.shape for o in objects)]  # shares a colour or a shape with the picture
    far = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in drawn]
    color, shape = rng.choice(near if near and rng.random() < 0.5 else far)
    contradicted = rng.choice(FRAMES).format(_a(f"{color} {shape}"))
    return [(entailed, "entailment"), (neutral, "neutral"), (contradicted, "contradiction")]


def generate_entailment(out_dir: str | Path, n: int, seed: int = 0, image_size: int = 64,
                        image_format: str = "png") -> Path:
    """Write ``n`` shapes images and ``3 n`` entailment pairs (see the module docstring) into ``out_dir``.

    Files are written under temporary names and renamed into place, the JSONL last.

    Args:
        out_dir: folder to write into: absent, empty, or an earlier synthetic dataset.
        n: number of images, at least 1.
        seed: seed of every random choice.
        image_size: side of the square images (32 to 1024).
        image_format: ``png`` or ``jpeg``.

    Returns:
        The path of ``out_dir/synth.jsonl`` (SNLI-VE keys).

    Raises:
        VlkitError: an argument out of range, a folder vlkit did not write, or a failed write.
    """
    from vlkit.data.ingest import hash_split
    from vlkit.data.synth_qa import _objects
    _check_args(n, seed, image_size, image_format)
    ext = IMAGE_FORMATS[image_format]
    with synthetic_folder(out_dir) as out:
        lines = []
        for i in range(n):
            rel = f"images/{i:06d}.{ext}"
            image, record = _make_example(seed, i, image_size)
            write_image(out / rel, image, image_format)
            split = hash_split(f"synth-entail:{seed}:{i}", VAL_FRACTION, TEST_FRACTION)
            for hypothesis, label in entailment_pairs(seed, i, _objects(seed, i, image_size)):
                lines.append(json.dumps({"Flikr30kID": rel, "sentence1": record["text"][0], "sentence2": hypothesis,
                                         "gold_label": label, "pairID": f"{i:06d}#{label[0]}", "split": split}))
        return write_lines(out / JSONL_NAME, lines)
