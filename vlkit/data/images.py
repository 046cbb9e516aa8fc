"""Reading and checking encoded images at ingest time."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

Image.MAX_IMAGE_PIXELS = 30_000 * 30_000


class ImageProblem(Exception):
    """The image cannot be used; the message says why."""


@dataclass
class ImageInfo:
    data: bytes  # the original encoded bytes, unchanged
    width: int
    height: int
    format: str


def read_image(path: Path) -> ImageInfo:
    """Read an image file and decode it once to prove it is whole.

    JPEGs are decoded in draft mode at 1/8 scale: every entropy-coded byte is still read, so truncation
    and corruption are caught, at a fraction of the cost of a full decode.

    Raises:
        ImageProblem: missing, empty, not an image, truncated or corrupt.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageProblem("image file not found") from None
    except IsADirectoryError:
        raise ImageProblem("is a directory, not an image") from None
    except OSError as exc:
        raise ImageProblem(f"cannot read image file ({exc.strerror})") from None
    if not data:
        raise ImageProblem("empty image file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height, fmt = img.width, img.height, img.format or "unknown"
            if fmt == "JPEG":
                img.draft(img.mode, (max(1, width // 8), max(1, height // 8)))
            img.load()
    except UnidentifiedImageError:
        raise ImageProblem("not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Warning) as exc:
        raise ImageProblem(f"truncated or corrupt image ({exc})") from None
    if width < 1 or height < 1:
        raise ImageProblem(f"image has no pixels ({width}x{height})")
    return ImageInfo(data=data, width=width, height=height, format=fmt)
