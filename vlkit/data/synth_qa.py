"""Synthetic question-answering datasets beside the shapes of :mod:`vlkit.data.synth`: unanswerable questions
(the VizWiz path) and words written in the image (the TextVQA path).

``unanswerable``: the shapes dataset, where three images in four get one more question about a shape or a
colour that is not in the image (``"what color is the triangle?"`` with no triangle), answered
``"unanswerable"``. Every JSONL line has, per question, ``answerable`` (false for those) and ``answer_type``
(``yes/no``, ``number``, ``other`` or ``unanswerable``), as VizWiz annotations do.

``text``: one or two words from :data:`WORDS` drawn in black (white on dark grey) on a plain background beside a
shape, with the question ``"what word is written?"`` (one word) or ``"what word is written on the left?"`` /
``"... on the right?"`` (two words side by side), and ``ocr_tokens``: the words in reading order (left to
right), as an OCR system would read them. The captions name the words, so a word-level tokenizer built from the captions knows
them.

Both write ``out_dir/images/`` and ``out_dir/synth.jsonl`` as :func:`vlkit.data.synth.generate` does (temporary
names renamed into place, the JSONL last); the output depends only on the arguments.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vlkit.data.answers import UNANSWERABLE
from vlkit.data.synth import (_BACKGROUNDS, _NOISE, COLORS, IMAGE_FORMATS, JSONL_NAME, SHAPES, _a, _check_args,
                              _make_example, _place_objects, generate, synthetic_folder, write_image, write_lines)
from vlkit.errors import VlkitError

#: the kinds of synthetic data ``vlkit data synth --kind`` makes
KINDS = ("shapes", "unanswerable", "text", "pairs", "entailment", "dialog", "video")
#: the words the ``text`` kind writes
WORDS = ("stop", "open", "cafe", "taxi", "bus", "exit", "sale", "park", "hotel", "bank", "pizza", "books",
         "menu", "shop", "bar", "gym", "zoo", "pub", "tea", "gas", "sushi", "bread", "milk", "ticket")
_INK = (15, 15, 15)
#: the share of images of the ``unanswerable`` kind that get a question they cannot answer
UNANSWERABLE_SHARE = 0.75


def generate_kind(out_dir: str | Path, n: int, kind: str = "shapes", seed: int = 0, image_size: int = 64,
                  image_format: str = "png") -> Path:
    """Write a synthetic dataset of one kind (see the module docstring) and its JSONL manifest.

    Args:
        out_dir: folder to write into: absent, empty, or an earlier synthetic dataset.
        n: number of images, at least 1.
        kind: ``shapes`` (:func:`vlkit.data.synth.generate`), ``unanswerable`` or ``text``.
        seed: seed of every random choice.
        image_size: side of the square images (32 to 1024).
        image_format: ``png`` or ``jpeg``.

    Returns:
        The path of ``out_dir/synth.jsonl``.

    Raises:
        VlkitError: an unknown kind, an argument out of range, a folder vlkit did not write, or a failed write.
    """
    if kind not in KINDS:
        raise VlkitError(f"unknown synthetic data kind {kind!r}; choose one of {', '.join(KINDS)}")
    if kind == "shapes":
        return generate(out_dir, n, seed=seed, image_size=image_size, image_format=image_format)
    if kind == "entailment":  # SNLI-VE lines: three (hypothesis, label) pairs per image (vlkit.data.synth_entail)
        from vlkit.data.synth_entail import generate_entailment

        return generate_entailment(out_dir, n, seed=seed, image_size=image_size, image_format=image_format)
    if kind == "pairs":  # NLVR2: two images and a sentence (vlkit.data.synth_pairs)
        from vlkit.data.synth_pairs import generate_pairs

        return generate_pairs(out_dir, n, seed=seed, image_size=image_size, image_format=image_format)
    if kind == "video":  # action clips of moving shapes (vlkit.data.synth_video)
        from vlkit.data.synth_video import generate_videos

        return generate_videos(out_dir, n, seed=seed, image_size=image_size)
    if kind == "dialog":  # Visual Dialog: a caption and three rounds per image, as a VisDial file
        from vlkit.data.synth_dialog import generate_dialogs

        return generate_dialogs(out_dir, n, seed=seed, image_size=image_size, image_format=image_format)
    _check_args(n, seed, image_size, image_format)
    ext = IMAGE_FORMATS[image_format]
    make = _unanswerable_example if kind == "unanswerable" else _text_example
    with synthetic_folder(out_dir) as out:
        lines = []
        for i in range(n):
            rel = f"images/{i:06d}.{ext}"
            image, record = make(seed, i, image_size)
            write_image(out / rel, image, image_format)
            lines.append(json.dumps({"image": rel, **record}, ensure_ascii=False))
        return write_lines(out / JSONL_NAME, lines)


def answer_type(answer: str) -> str:
    """The VQA answer type of a synthetic answer: ``yes/no``, ``number``, ``unanswerable`` or ``other``."""
    if answer in ("yes", "no"):
        return "yes/no"
    if answer.isdigit():
        return "number"
    return "unanswerable" if answer == UNANSWERABLE else "other"


def _unanswerable_example(seed: int, index: int, image_size: int) -> tuple[Image.Image, dict]:
    """The shapes example ``index`` of ``seed``, and (for :data:`UNANSWERABLE_SHARE` of them) one question it
    cannot answer."""
    image, record = _make_example(seed, index, image_size)
    rng = random.Random(f"vlkit-synth-unanswerable:{seed}:{index}")
    questions, answers = list(record["questions"]), [list(a) for a in record["answers"]]
    answerable = [True] * len(questions)
    if rng.random() < UNANSWERABLE_SHARE:
        objects = _objects(seed, index, image_size)
        absent_shapes = [s for s in SHAPES if all(o.shape != s for o in objects)]
        absent_colors = [c for c in COLORS if all(o.color != c for o in objects)]
        pool = [f"what color is the {s}?" for s in absent_shapes] + \
               [f"what shape is the {c} object?" for c in absent_colors]
        if pool:
            questions.append(rng.choice(pool))
            answers.append([UNANSWERABLE])
            answerable.append(False)
    record = {**record, "questions": questions, "answers": answers, "answerable": answerable,
              "answer_type": [answer_type(a[0]) for a in answers]}
    return image, record


def _objects(seed: int, index: int, image_size: int) -> list:
    """The objects drawn in shapes example ``index``: the draws :func:`vlkit.data.synth._make_example` makes
    first, repeated with the same seed."""
    rng = random.Random(f"vlkit-synth:{seed}:{index}")
    rng.choice(sorted(_BACKGROUNDS))
    return _place_objects(rng, image_size)


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def _text_example(seed: int, index: int, image_size: int) -> tuple[Image.Image, dict]:
    """A shape and one or two words on a noisy background; questions about the words, OCR tokens in reading
    order."""
    rng = random.Random(f"vlkit-synth-text:{seed}:{index}")
    background = rng.choice(sorted(_BACKGROUNDS))
    noise = np.random.default_rng(rng.getrandbits(64)).integers(-_NOISE, _NOISE + 1, (image_size, image_size, 1))
    pixels = np.clip(np.array(_BACKGROUNDS[background], dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, mode="RGB")
    draw = ImageDraw.Draw(image)
    color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
    side = max(8, image_size // 4)
    x0, y0 = rng.randint(1, image_size - side - 1), rng.randint(1, image_size // 3)
    box = (x0, y0, x0 + side - 1, y0 + side - 1)
    if shape == "circle":
        draw.ellipse(box, fill=COLORS[color])
    elif shape == "square":
        draw.rectangle(box, fill=COLORS[color])
    else:
        draw.polygon([((box[0] + box[2]) / 2, box[1]), (box[2], box[3]), (box[0], box[3])], fill=COLORS[color])
    words = rng.sample(WORDS, 2 if rng.random() < 0.7 else 1)
    font, baseline = _font(), image_size * 2 // 3
    for k, word in enumerate(words):  # left to right: the reading order
        x = 2 + k * (image_size // 2) if len(words) == 2 else image_size // 4
        draw.text((x, baseline), word, fill=(240, 240, 240) if background == "dark grey" else _INK, font=font)
    if len(words) == 1:
        questions, answers = ["what word is written?"], [[words[0]]]
        caption = f"the word {words[0]} written below {_a(color + ' ' + shape)}"
    else:
        order = [0, 1] if rng.random() < 0.5 else [1, 0]
        where = ("left", "right")
        questions = [f"what word is written on the {where[k]}?" for k in order]
        answers = [[words[k]] for k in order]
        caption = f"the words {words[0]} and {words[1]} written below {_a(color + ' ' + shape)}"
    record = {"text": [caption, f"{_a(color + ' ' + shape)} on a {background} background"],
              "questions": questions, "answers": answers, "ocr_tokens": list(words)}
    return image, record
