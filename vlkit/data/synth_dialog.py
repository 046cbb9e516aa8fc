"""Synthetic Visual Dialog data: the shapes images of :mod:`vlkit.data.synth` with a caption and a three-round
dialog about them, written as a VisDial v1.0 file (so it goes through the same reader as the real data).

Every image gets the caption ``"shapes on a <background> background"`` (it names no shape, colour or count) and
the rounds

1. ``"how many shapes are there?"``: ``one``, ``two`` or ``three``;
2. ``"what color is the biggest shape?"``: the colour of the largest object;
3. ``"is there a(n) <colour> <shape>?"``: ``yes`` for an object of the image, ``no`` for one it lacks (half each),

each with :data:`NUM_OPTIONS` answer options: the right answer and others drawn from every answer of the kind
(colours, shapes, counts, yes and no), in random order. Round 2 of every dialog has dense relevance: 1 for
the right colour, 0.5 for the colour of another object in the image, 0 otherwise.

Output::

    out_dir/images/000000.png ...                       # the shapes images (or .jpg)
    out_dir/visdial_synth.json                          # {"version", "split", "data": {...}}, no split: ingest
                                                        # derives one from the image id
    out_dir/visdial_synth_dense_annotations.json        # [{"image_id", "round_id": 2, "gt_relevance"}]

Files are written under temporary names and renamed into place, the dialogs file last; the output depends
only on the arguments.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from vlkit.data.synth import (_BACKGROUNDS, COLORS, IMAGE_FORMATS, SHAPES, _check_args, _a, _make_example,
                              _place_objects, synthetic_folder, write_image, write_lines)

DIALOG_NAME = "visdial_synth.json"
DENSE_NAME = "visdial_synth_dense_annotations.json"
NUM_OPTIONS = 10
COUNT_WORDS = ("one", "two", "three")
#: every answer the dialogs use; a round's wrong options are drawn from these
ANSWERS = (*COLORS, *SHAPES, *COUNT_WORDS, "yes", "no")
DENSE_ROUND = 2


def generate_dialogs(out_dir: str | Path, n: int, seed: int = 0, image_size: int = 64,
                     image_format: str = "png") -> Path:
    """Write ``n`` shapes images, their dialogs and dense annotations (see the module docstring).

    Args:
        out_dir: folder to write into: absent, empty, or an earlier synthetic dataset.
        n: number of images (one dialog each), at least 1.
        seed: seed of every random choice.
        image_size: side of the square images (32 to 1024).
        image_format: ``png`` or ``jpeg``.

    Returns:
        The path of the dialogs file, ``out_dir/visdial_synth.json``.

    Raises:
        VlkitError: an argument out of range, a folder vlkit did not write, or a failed write.
    """
    _check_args(n, seed, image_size, image_format)
    ext = IMAGE_FORMATS[image_format]
    questions: dict[str, int] = {}
    answers = {a: i for i, a in enumerate(ANSWERS)}
    dialogs, dense = [], []
    with synthetic_folder(out_dir) as out:
        for i in range(n):
            image, _ = _make_example(seed, i, image_size)
            write_image(out / f"images/{i:06d}.{ext}", image, image_format)
            background, objects = _scene(seed, i, image_size)
            rng = random.Random(f"vlkit-synth-dialog:{seed}:{i}")
            rounds, relevance = _rounds(rng, objects)
            dialog = []
            for question, answer, options in rounds:
                dialog.append({"question": questions.setdefault(question, len(questions)),
                               "answer": answers[answer],
                               "answer_options": [answers[o] for o in options],
                               "gt_index": options.index(answer)})
            dialogs.append({"image_id": i, "caption": f"shapes on a {background} background", "dialog": dialog})
            dense.append({"image_id": i, "round_id": DENSE_ROUND, "gt_relevance": relevance})
        body = {"version": "1.0", "split": None,
                "data": {"questions": list(questions), "answers": list(ANSWERS), "dialogs": dialogs}}
        write_lines(out / DENSE_NAME, [json.dumps(dense)])
        return write_lines(out / DIALOG_NAME, [json.dumps(body)])


def _scene(seed: int, index: int, image_size: int) -> tuple[str, list]:
    """The background and objects of shapes example ``index``: the draws
    :func:`vlkit.data.synth._make_example` makes first, repeated with the same seed."""
    rng = random.Random(f"vlkit-synth:{seed}:{index}")
    background = rng.choice(sorted(_BACKGROUNDS))
    return background, _place_objects(rng, image_size)


def _options(rng: random.Random, answer: str) -> list[str]:
    """The right answer and ``NUM_OPTIONS - 1`` others, shuffled."""
    options = [answer, *rng.sample([a for a in ANSWERS if a != answer], NUM_OPTIONS - 1)]
    rng.shuffle(options)
    return options


def _rounds(rng: random.Random, objects: list) -> tuple[list[tuple[str, str, list[str]]], list[float]]:
    """The three rounds ``(question, answer, options)`` of an image, and round 2's relevance per option."""
    biggest = objects[0].color
    present = {(o.color, o.shape) for o in objects}
    if rng.random() < 0.5:
        color, shape = rng.choice(sorted(present))
        yes_no = "yes"
    else:
        color, shape = rng.choice(sorted({(c, s) for c in COLORS for s in SHAPES} - present))
        yes_no = "no"
    rounds = [("how many shapes are there?", COUNT_WORDS[len(objects) - 1]),
              ("what color is the biggest shape?", biggest),
              (f"is there {_a(color + ' ' + shape)}?", yes_no)]
    out = [(q, a, _options(rng, a)) for q, a in rounds]
    others = {o.color for o in objects[1:]} - {biggest}
    relevance = [1.0 if o == biggest else 0.5 if o in others else 0.0 for o in out[DENSE_ROUND - 1][2]]
    return out, relevance
