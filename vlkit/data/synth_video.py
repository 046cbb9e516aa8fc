"""Synthetic action videos: one coloured shape that moves, grows, shrinks, rotates or bounces.

Every video shows one filled shape (circle, square or triangle, in a colour of :data:`vlkit.data.synth.COLORS`)
on a plain background doing one of :data:`ACTIONS`; its class is the action and its captions say what moves and
how ("a red circle moves to the left"). Telling ``moving left`` from ``moving right`` needs the order of the
frames: a model that only averages frames cannot.

Layout of the output (``layout="jsonl"``)::

    out_dir/
        videos/000000.mp4 ...
        synth.jsonl          # {"video": "videos/000000.mp4", "text": [...], "label": 3, "class_name": ...}

or (``layout="folders"``) ``out_dir/videos/<class name>/000000.mp4``, a class-folder layout to ingest as it is.

Guarantees the tests rely on: the motion is visible in the decoded frames (the shape's centroid moves by at
least a quarter of the frame for the moving classes and comes back for ``bouncing``; its area changes by at
least half for growing and shrinking; it keeps its place and area while rotating), and the files depend only
on the arguments (MPEG-4 part 2 in mp4, one encoder thread, timestamps set).
"""

from __future__ import annotations

import io
import json
import math
import random
from fractions import Fraction
from pathlib import Path

from PIL import Image, ImageDraw

from vlkit.data.synth import COLORS, JSONL_NAME, _BACKGROUNDS, _a, _is_int, synthetic_folder, write_lines
from vlkit.errors import VlkitError

#: the classes, in label order (sorted, as a class-folder ingest numbers them)
ACTIONS: tuple[str, ...] = ("bouncing", "growing", "moving down", "moving left", "moving right", "moving up",
                            "rotating", "shrinking")
_VERBS = {"bouncing": "bounces", "growing": "grows", "moving down": "moves down", "moving left": "moves to the left",
          "moving right": "moves to the right", "moving up": "moves up", "rotating": "rotates",
          "shrinking": "shrinks"}
SHAPES = ("circle", "square", "triangle")
CODECS = {"libx264": ("mp4", "mp4"), "mpeg4": ("mp4", "mp4")}
LAYOUTS = ("jsonl", "folders")
MIN_SIZE, MAX_SIZE = 32, 256
MIN_FRAMES, MAX_FRAMES = 4, 128


def generate_videos(out_dir: str | Path, n: int, seed: int = 0, image_size: int = 64, frames: int = 16,
                    fps: int = 8, layout: str = "jsonl", codec: str = "mpeg4") -> Path:
    """Write ``n`` synthetic action videos and their manifest (or class folders).

    Args:
        out_dir: folder to write into: absent, empty, or an earlier synthetic dataset.
        n: number of videos, at least 1; video ``i`` shows action ``ACTIONS[i % 8]``.
        seed: seed of every random choice (shape, colour, background, start, speed).
        image_size: side of the square frames, 32 to 256.
        frames: frames per video, 4 to 128.
        fps: frames per second written in the file.
        layout: ``jsonl`` (``synth.jsonl`` with ``label``, ``class_name`` and captions) or ``folders``
            (``videos/<class>/``).
        codec: ``mpeg4`` (MPEG-4 part 2: byte-for-byte repeatable) or ``libx264`` (H.264, whose output was
            seen to differ between two encodes of the same frames in one process), in an mp4 file.

    Returns:
        The path to ingest: ``out_dir/synth.jsonl``, or ``out_dir/videos`` for ``folders``.

    Raises:
        VlkitError: an argument out of range, a folder vlkit did not write, a failed write, or no PyAV.
    """
    for name, value, low, high in (("n", n, 1, None), ("image_size", image_size, MIN_SIZE, MAX_SIZE),
                                   ("frames", frames, MIN_FRAMES, MAX_FRAMES), ("fps", fps, 1, 120)):
        if not _is_int(value) or value < low or (high is not None and value > high):
            span = f"at least {low}" if high is None else f"from {low} to {high}"
            raise VlkitError(f"synthetic video {name} must be an integer {span}, got {value!r}")
    if not _is_int(seed):
        raise VlkitError(f"synthetic dataset seed must be an integer, got {seed!r}")
    if layout not in LAYOUTS:
        raise VlkitError(f"synthetic video layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if codec not in CODECS:
        raise VlkitError(f"synthetic video codec must be one of {', '.join(CODECS)}, got {codec!r}")
    from vlkit.data.video import require_av

    require_av()
    from vlkit.data.synth import _write_atomic

    with synthetic_folder(out_dir) as out:
        lines = []
        for i in range(n):
            images, record = make_video(seed, i, image_size, frames)
            action = record["class_name"]
            rel = f"videos/{action}/{i:06d}.mp4" if layout == "folders" else f"videos/{i:06d}.mp4"
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            _write_atomic(out / rel, encode_video(images, fps, codec))
            lines.append(json.dumps({"video": rel, **record}, ensure_ascii=False))
        if layout == "folders":
            write_lines(out / "videos.jsonl", lines)  # what each video shows, beside the class folders
            return out / "videos"
        return write_lines(out / JSONL_NAME, lines)


def make_video(seed: int, index: int, image_size: int, frames: int) -> tuple[list[Image.Image], dict]:
    """The frames of video ``index`` and its record (``text``, ``label``, ``class_name``, ``shape``, ``color``).

    Depends only on its arguments.
    """
    rng = random.Random(f"vlkit-synth-video:{seed}:{index}")
    action = ACTIONS[index % len(ACTIONS)]
    shapes = ("square", "triangle") if action == "rotating" else SHAPES  # a turning circle looks still
    shape, color = rng.choice(shapes), rng.choice(sorted(COLORS))
    background = _BACKGROUNDS[rng.choice(sorted(_BACKGROUNDS))]
    s = image_size
    size = rng.uniform(0.22, 0.3) * s  # the shape's side (diameter) while it moves
    travel = rng.uniform(0.4, 0.5) * s  # how far a moving shape goes
    cx, cy = s / 2 + rng.uniform(-0.05, 0.05) * s, s / 2 + rng.uniform(-0.05, 0.05) * s
    turn = rng.choice((-1, 1)) * rng.uniform(0.5, 1.0) * math.pi / 2  # rotating: up to a quarter turn
    images = []
    for t in range(frames):
        u = t / (frames - 1)  # 0 .. 1 over the clip
        x, y, side, angle = cx, cy, size, 0.0
        if action.startswith("moving"):
            dx, dy = {"moving left": (-1, 0), "moving right": (1, 0), "moving up": (0, -1),
                      "moving down": (0, 1)}[action]
            x, y = cx + dx * travel * (u - 0.5), cy + dy * travel * (u - 0.5)
        elif action == "growing":
            side = s * (0.14 + 0.3 * u)
        elif action == "shrinking":
            side = s * (0.44 - 0.3 * u)
        elif action == "rotating":
            angle = turn * u
        elif action == "bouncing":  # down to the floor and back up, twice
            y = cy - travel / 2 + travel * abs(math.sin(2 * math.pi * u))
        images.append(_draw(s, background, COLORS[color], shape, x, y, side, angle))
    name = f"{color} {shape}"
    verb = _VERBS[action]
    captions = [f"{_a(name)} {verb}", f"the {name} {verb}" if rng.random() < 0.5 else f"a {shape} that {verb}"]
    return images, {"text": captions, "label": ACTIONS.index(action), "class_name": action, "shape": shape,
                    "color": color}


def _draw(size: int, background: tuple[int, int, int], color: tuple[int, int, int], shape: str, x: float,
          y: float, side: float, angle: float) -> Image.Image:
    img = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(img)
    r = side / 2
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=color)
        return img
    corners = ([(-r, -r), (r, -r), (r, r), (-r, r)] if shape == "square"
               else [(0.0, -r), (r, r / 2), (-r, r / 2)])  # the triangle's centroid at (x, y)
    cos, sin = math.cos(angle), math.sin(angle)
    draw.polygon([(x + px * cos - py * sin, y + px * sin + py * cos) for px, py in corners], fill=color)
    return img


def encode_video(images: list[Image.Image], fps: int, codec: str = "mpeg4") -> bytes:
    """Encode RGB frames as an mp4 (yuv420p, one encoder thread); with ``mpeg4`` the bytes depend only on the
    frames."""
    import av

    buf = io.BytesIO()
    container = av.open(buf, mode="w", format=CODECS[codec][0])
    stream = container.add_stream(codec, rate=fps)
    stream.width, stream.height = images[0].size
    stream.pix_fmt = "yuv420p"
    stream.codec_context.thread_count = 1
    stream.codec_context.gop_size = 8
    if codec == "libx264":
        stream.codec_context.options = {"crf": "18", "preset": "fast"}
    else:
        stream.codec_context.bit_rate = 400_000
    for t, image in enumerate(images):
        frame = av.VideoFrame.from_image(image)
        frame.pts, frame.time_base = t, Fraction(1, fps)  # set, never left to the encoder's guess
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return buf.getvalue()
