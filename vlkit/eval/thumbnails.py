"""Small square thumbnails of a split's images, decoded from the dataset's image blobs, for the report."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from vlkit.data.decode import ImageDecodeError, decode_rgb
from vlkit.data.rows import image_error, reading
from vlkit.data.store import open_dataset, split_indices


def thumbnail(data: bytes, size: int = 160) -> np.ndarray:
    """``[size, size, 3]`` uint8: the centre square of an encoded image, resized.

    Small images are enlarged with nearest-neighbour sampling so that they stay crisp.

    Raises:
        ImageDecodeError: not a readable image, or over the pixel limit.
    """
    img = decode_rgb(data, draft=size)
    side = min(img.width, img.height)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    img = img.crop((left, top, left + side, top + side))
    resample = Image.Resampling.NEAREST if size >= 2 * side else Image.Resampling.LANCZOS
    return np.asarray(img.resize((size, size), resample))


def split_thumbnails(dataset: str | Path, split: str | None, positions: Sequence[int],
                     size: int = 160) -> list[np.ndarray]:
    """Thumbnails of the images at ``positions`` of ``split`` (positions in the split's dataset order, as in
    :class:`vlkit.inference.embed.Embeddings`).

    Raises:
        RowError: an image does not decode or is over the pixel limit (naming its row id), or a data file
            of the dataset is missing.
    """
    if not positions:
        return []
    ds = open_dataset(dataset)
    with reading(dataset):
        offsets = split_indices(ds, split)
        wanted = [offsets[p] for p in positions]
        unique = sorted(set(wanted))
        blobs = ds.read_blobs("image", indices=unique, preserve_order=True)
    by_offset = {}
    for offset, (_, data) in zip(unique, blobs):
        try:
            by_offset[offset] = thumbnail(data, size)
        except ImageDecodeError as exc:
            with reading(dataset):
                row_id = ds.take([offset], columns=["id"]).column("id")[0].as_py()
            raise image_error(dataset, row_id, exc) from None
    return [by_offset[o] for o in wanted]
