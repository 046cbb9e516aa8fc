"""Small square thumbnails of a split's images, decoded from the dataset's image blobs, for the report."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from vlkit.data.store import open_dataset, split_indices


def thumbnail(data: bytes, size: int = 160) -> np.ndarray:
    """``[size, size, 3]`` uint8: the centre square of an encoded image, resized.

    Small images are enlarged with nearest-neighbour sampling so that they stay crisp.
    """
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (size, size))
    img = img.convert("RGB")
    side = min(img.width, img.height)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    img = img.crop((left, top, left + side, top + side))
    resample = Image.Resampling.NEAREST if size >= 2 * side else Image.Resampling.LANCZOS
    return np.asarray(img.resize((size, size), resample))


def split_thumbnails(dataset: str | Path, split: str | None, positions: Sequence[int],
                     size: int = 160) -> list[np.ndarray]:
    """Thumbnails of the images at ``positions`` of ``split`` (positions in the split's dataset order, as in
    :class:`vlkit.search.embed.Embeddings`)."""
    if not positions:
        return []
    ds = open_dataset(dataset)
    offsets = split_indices(ds, split)
    wanted = [offsets[p] for p in positions]
    unique = sorted(set(wanted))
    blobs = ds.read_blobs("image", indices=unique, preserve_order=True)
    by_offset = {offset: thumbnail(data, size) for offset, (_, data) in zip(unique, blobs)}
    return [by_offset[o] for o in wanted]
