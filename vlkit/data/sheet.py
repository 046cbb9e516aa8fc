"""A contact sheet: a grid of a dataset's images with their first caption, for a person to look at. Rows of two
images (NLVR2 pairs) show both side by side, the sentence followed by its label."""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from vlkit.data.decode import ImageDecodeError, decode_rgb
from vlkit.data.rows import image_error, reading
from vlkit.data.store import open_dataset, split_indices
from vlkit.errors import DataError
from vlkit.utils.fs import atomic_write, check_output_file


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def _label(row: dict) -> str:
    if row["captions"]:
        text = row["captions"][0]
    elif row["class_name"] is not None:
        text = f"[{row['class_name']}]"
    elif row["questions"]:
        text = f"Q: {row['questions'][0]} A: {row['answers'][0][0]}"
    else:
        text = ""
    return text


def _paste(sheet: Image.Image, data: bytes, x0: int, y0: int, thumb: int, dataset, row_id: str) -> None:
    """Decode ``data`` and paste it, scaled to fit a ``thumb`` square, centred in the square at ``(x0, y0)``."""
    try:
        img = decode_rgb(data, draft=thumb)
    except ImageDecodeError as exc:
        raise image_error(dataset, row_id, exc) from None
    scale = thumb / max(img.width, img.height)
    resample = Image.Resampling.NEAREST if scale >= 2 else Image.Resampling.BICUBIC  # keep tiny images crisp
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), resample)
    sheet.paste(img, (x0 + (thumb - img.width) // 2, y0 + (thumb - img.height) // 2))


def contact_sheet(
    dataset: str | Path, out: str | Path, n: int = 16, split: str | None = None, thumb: int = 224, cols: int = 4
) -> Path:
    """Draw the first ``n`` images (of ``split``) with their first caption and id into a PNG.

    Returns:
        The path of the written image.

    Raises:
        DataError: ``n``, ``thumb`` or ``cols`` is below 1.
        RowError: an image does not decode or is over the pixel limit (naming its row id), or a data file
            of the dataset is missing. Nothing is written then.
    """
    for name, value in (("n", n), ("thumb", thumb), ("cols", cols)):
        if value < 1:
            raise DataError(f"contact sheet: {name} must be at least 1, got {value}")
    out = check_output_file(out, inputs=[dataset], what="--out")  # before any image is read
    ds = open_dataset(dataset)
    with reading(dataset):
        offsets = split_indices(ds, split)[:n]
        rows = ds.take(offsets, columns=["id", "captions", "class_name", "questions", "answers"]).to_pylist()
        blobs = ds.read_blobs("image", indices=offsets, preserve_order=True)
        pairs = "image2" in ds.schema.names
        seconds = ds.read_blobs("image2", indices=offsets, preserve_order=True) if pairs else [(0, None)] * len(rows)
    font, small = _font(14), _font(11)
    line_h, text_lines = 17, 4
    cell_w, cell_h = (2 * thumb + 4 if pairs else thumb) + 16, thumb + 16 + line_h * text_lines + 14
    cols = min(cols, len(rows))
    grid_rows = (len(rows) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * cell_w, grid_rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (row, (_, data), (_, data2)) in enumerate(zip(rows, blobs, seconds)):
        x0, y0 = (i % cols) * cell_w + 8, (i // cols) * cell_h + 8
        _paste(sheet, data, x0, y0, thumb, dataset, row["id"])
        if data2 is not None:  # the second image of a pair, on the right
            _paste(sheet, data2, x0 + thumb + 4, y0, thumb, dataset, row["id"])
        label = _label(row) + (f" [{row['class_name']}]" if pairs and row["class_name"] is not None else "")
        lines = textwrap.wrap(label, width=max(10, (cell_w - 16) // 7))[:text_lines]
        for j, line in enumerate(lines):
            draw.text((x0, y0 + thumb + 4 + j * line_h), line, fill="black", font=font)
        draw.text((x0, y0 + thumb + 4 + text_lines * line_h), row["id"][-40:], fill="gray", font=small)
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    sheet.save(buf, "PNG")
    return atomic_write(out, buf.getvalue())
