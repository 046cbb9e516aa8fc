"""Pictures of explanations: a heat map laid over its image, and grids of labelled images."""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

#: Anchor colours of the heat map's colour scale, from cold (no contribution) to hot.
_SCALE = np.array([[0, 0, 0], [60, 20, 140], [200, 40, 60], [250, 150, 20], [255, 250, 150]], dtype=np.float32)


def colorize(heat: np.ndarray) -> np.ndarray:
    """A heat map in [0, 1] ``[H, W]`` as RGB uint8 ``[H, W, 3]`` on a dark-to-bright colour scale."""
    pos = np.clip(heat, 0.0, 1.0) * (len(_SCALE) - 1)
    low = np.floor(pos).astype(int).clip(0, len(_SCALE) - 2)
    frac = (pos - low)[..., None]
    return (_SCALE[low] * (1 - frac) + _SCALE[low + 1] * frac).round().astype(np.uint8)


def overlay(image: Image.Image, heat: np.ndarray, alpha: float = 0.55) -> Image.Image:
    """``image`` with ``heat`` ([0, 1], any size; resized to the image) blended over it, strongest where hot.

    Args:
        image: the picture.
        heat: the heat map ``[h, w]``.
        alpha: the largest opacity of the heat colours.
    """
    image = image.convert("RGB")
    heat_img = Image.fromarray((np.clip(heat, 0, 1) * 255).astype(np.uint8), mode="L").resize(
        image.size, Image.BILINEAR)
    h = np.asarray(heat_img, dtype=np.float32) / 255.0
    base = np.asarray(image, dtype=np.float32)
    weight = (alpha * np.sqrt(h))[..., None]  # faint heat stays visible, the image shows through everywhere
    mixed = base * (1 - weight) + colorize(h).astype(np.float32) * weight
    return Image.fromarray(mixed.round().clip(0, 255).astype(np.uint8), mode="RGB")


def grid(images: Sequence[Image.Image], labels: Sequence[str] = (), columns: int | None = None,
         cell: int = 160) -> Image.Image:
    """Images side by side in rows of ``columns``, each scaled to ``cell`` pixels, with a label beneath.

    Args:
        images: the pictures.
        labels: a caption for each (may be shorter than ``images``).
        columns: images per row (default: all in one row).
        cell: the side of each picture.
    """
    columns = max(1, columns or len(images))
    rows = (len(images) + columns - 1) // columns
    label_h = 16 if labels else 0
    sheet = Image.new("RGB", (columns * cell, rows * (cell + label_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, img in enumerate(images):
        x, y = (i % columns) * cell, (i // columns) * (cell + label_h)
        sheet.paste(img.convert("RGB").resize((cell, cell), Image.BICUBIC), (x, y))
        if i < len(labels):
            text = labels[i] if len(labels[i]) <= cell // 6 else labels[i][: cell // 6 - 1] + "…"
            draw.text((x + 3, y + cell + 2), text, fill=(20, 20, 20))
    return sheet


def overlay_grid(image: Image.Image, heats: Sequence[np.ndarray], labels: Sequence[str] = (),
                 columns: int | None = None, cell: int = 160) -> Image.Image:
    """One :func:`overlay` of ``image`` per heat map, in a :func:`grid` with a label beneath each (a text's map,
    then one map per word).

    Args:
        image: the picture.
        heats: heat maps in [0, 1], ``[h, w]`` each.
        labels: a caption for each map.
        columns: maps per row (default: all in one row).
        cell: the side of each picture.
    """
    return grid([overlay(image, heat) for heat in heats], labels, columns, cell)


def to_image(pixels) -> Image.Image:
    """An RGB picture from a float tensor or array ``[3, H, W]`` in [0, 1]."""
    arr = np.asarray(pixels.detach().cpu() if hasattr(pixels, "detach") else pixels, dtype=np.float32)
    return Image.fromarray((arr.transpose(1, 2, 0).clip(0, 1) * 255).round().astype(np.uint8), mode="RGB")


def png_bytes(image: Image.Image) -> bytes:
    """The picture encoded as PNG."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


#: PNG text key that marks a picture written by vlkit (it may be replaced by a later run).
MARKER_KEY = "vlkit-figure"


def written_by_vlkit(path) -> bool:
    """Whether the file at ``path`` is a PNG that vlkit wrote (it carries :data:`MARKER_KEY`)."""
    from vlkit.data.decode import open_image

    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if head != b"\x89PNG\r\n\x1a\n":
                return False
            fh.seek(0)
            img = open_image(fh.read())
        return MARKER_KEY in getattr(img, "text", {})
    except Exception:  # unreadable or not an image: not vlkit's
        return False


def check_figure_path(path, *, inputs: Sequence = (), what: str = "--out"):
    """Raise unless ``path`` may receive a figure: a ``.png`` name, absent or a figure vlkit wrote earlier,
    not one of the inputs, in a folder that can be created.

    Returns:
        The path.

    Raises:
        VlkitError: one line naming the path and why.
    """
    from pathlib import Path

    from vlkit.errors import VlkitError
    from vlkit.utils.fs import check_output_file

    path = check_output_file(Path(path), inputs=inputs, what=what)
    if path.suffix.lower() != ".png":
        raise VlkitError(f"{what} {path}: figures are written as PNG; name a .png file")
    if path.exists() and not written_by_vlkit(path):
        raise VlkitError(f"{what} {path}: exists and is not a figure vlkit wrote; name a new file")
    return path


def save_figure(image: Image.Image, path, description: str = "") -> None:
    """Write ``image`` as a PNG carrying vlkit's marker, beside ``path`` and then renamed over it."""
    from pathlib import Path

    from PIL import PngImagePlugin

    from vlkit.utils.fs import atomic_write

    info = PngImagePlugin.PngInfo()
    info.add_text(MARKER_KEY, description or "1")
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True, pnginfo=info)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, buf.getvalue())
