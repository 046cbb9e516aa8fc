"""Bounded image decoding: every decode in vlkit opens the image here first.

The size of an image is read from its header and checked against one pixel limit *before* any pixel is
decoded, so a small file that expands to gigabytes (a decompression bomb) is refused at the cost of reading
its header. The limit is ``DEFAULT_MAX_PIXELS`` unless set by the ``VLKIT_MAX_PIXELS`` environment variable,
by ``vlkit --max-pixels N ...`` or by :func:`set_max_pixels`.
"""

from __future__ import annotations

import io
import os

from PIL import Image, UnidentifiedImageError

from vlkit.errors import VlkitError

DEFAULT_MAX_PIXELS = 64_000_000  # 8000 x 8000
ENV_VAR = "VLKIT_MAX_PIXELS"

# Pillow's own guard (a warning over 89 Mpx, an error over twice that) would refuse or warn before vlkit's
# limit is checked: every decode in vlkit opens images through open_image, whose check replaces it.
Image.MAX_IMAGE_PIXELS = None

DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
                 Image.DecompressionBombWarning, EOFError)

_override: int | None = None


class ImageDecodeError(ValueError):
    """The bytes are not a readable image; the message says why."""


class ImageTooLarge(ImageDecodeError):
    """The image's header declares more pixels than the limit allows."""

    def __init__(self, width: int, height: int, limit: int):
        self.width, self.height, self.limit = width, height, limit
        super().__init__(f"image of {width}x{height} = {width * height / 1e6:.1f} Mpx is over the pixel limit "
                         f"of {limit / 1e6:.1f} Mpx (raise it with --max-pixels or {ENV_VAR})")


def max_pixels() -> int:
    """The pixel limit in force: :func:`set_max_pixels`, else ``$VLKIT_MAX_PIXELS``, else the default."""
    if _override is not None:
        return _override
    value = os.environ.get(ENV_VAR)
    if value:
        try:
            limit = int(float(value))
        except ValueError:
            raise VlkitError(f"{ENV_VAR}={value!r} is not a number of pixels") from None
        if limit < 1:
            raise VlkitError(f"{ENV_VAR}={value!r} must be at least 1")
        return limit
    return DEFAULT_MAX_PIXELS


def set_max_pixels(limit: int | None) -> None:
    """Set the pixel limit for this process (``None``: back to the environment or the default)."""
    global _override
    if limit is not None and limit < 1:
        raise ValueError(f"the pixel limit must be at least 1, not {limit}")
    _override = limit


def check_pixels(width: int, height: int, limit: int | None = None) -> None:
    """Raise :class:`ImageTooLarge` when ``width x height`` is over the limit."""
    limit = max_pixels() if limit is None else limit
    if width * height > limit:
        raise ImageTooLarge(width, height, limit)


def open_image(data: bytes, limit: int | None = None) -> Image.Image:
    """Open encoded bytes lazily (header only) and check the declared size against the pixel limit.

    Returns:
        The not-yet-decoded Pillow image; call ``.draft()`` and ``.load()`` on it as needed.

    Raises:
        ImageTooLarge: more pixels than the limit.
        ImageDecodeError: not an image Pillow can read.
    """
    if not data:
        raise ImageDecodeError("empty image (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image (unrecognised format)") from None
    except DECODE_ERRORS as exc:
        raise ImageDecodeError(f"unreadable image header ({exc})") from None
    check_pixels(img.width, img.height, limit)
    return img


def load_image(img: Image.Image) -> Image.Image:
    """Decode the pixels of an image from :func:`open_image`, mapping Pillow's errors to ImageDecodeError."""
    try:
        img.load()
    except DECODE_ERRORS as exc:
        raise ImageDecodeError(f"truncated or corrupt image ({exc})") from None
    return img


def decode_rgb_scaled(data: bytes, draft: int | None = None,
                      limit: int | None = None) -> tuple[Image.Image, tuple[int, int], float]:
    """Encoded bytes to an RGB image, bounded by the pixel limit, with the scale JPEG draft mode applied.

    Args:
        data: the encoded image.
        draft: decode JPEGs at a reduced scale whose sides stay >= ``draft`` pixels (None: full size).
        limit: the pixel limit (None: :func:`max_pixels`).

    Returns:
        The RGB image, the original (width, height), and the reduction factor of draft mode (1.0 when none):
        original pixel coordinates divided by it give coordinates in the decoded image.
    """
    img = open_image(data, limit)
    original_size, factor = img.size, 1.0
    if draft is not None and img.format == "JPEG":
        # Requesting (m, m) makes Pillow pick the largest scale 1/s with s <= min(W // m, H // m), so both
        # decoded sides stay >= m.
        drafted = img.draft("RGB", (draft, draft))
        if drafted is not None:
            factor = original_size[0] / drafted[1][2]
    img = load_image(img)
    try:
        return (img if img.mode == "RGB" else img.convert("RGB")), original_size, factor
    except DECODE_ERRORS as exc:
        raise ImageDecodeError(f"cannot convert image to RGB ({exc})") from None


def decode_rgb(data: bytes, draft: int | None = None, limit: int | None = None) -> Image.Image:
    """Encoded bytes to an RGB image, bounded by the pixel limit (see :func:`decode_rgb_scaled`)."""
    return decode_rgb_scaled(data, draft, limit)[0]
