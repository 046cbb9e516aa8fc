"""Reading and checking encoded images at ingest time.

An image file is read only when it is a regular file inside its images root (unless allowed outside), and
at most ``max_bytes + 1`` of its bytes are read; its size is checked against the pixel limit of
:mod:`vlkit.data.decode` from the header, before any pixel is decoded.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from vlkit.data.decode import ImageDecodeError, ImageTooLarge, load_image, open_image

DEFAULT_MAX_IMAGE_BYTES = 64 * 1024 * 1024

_KINDS = {stat.S_IFIFO: "a named pipe (FIFO)", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a directory"}


class ImageProblem(Exception):
    """The image cannot be used; the message says why."""


@dataclass
class ImageInfo:
    data: bytes  # the original encoded bytes, unchanged
    width: int
    height: int
    format: str
    second: "ImageInfo | None" = None  # a row's second image (pairs such as NLVR2's left and right)


def format_bytes(n: int) -> str:
    """``n`` bytes in the largest binary unit that states it exactly (``64 MiB``, ``3129 bytes``)."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} bytes"


def outside_root(path: Path, root: Path) -> bool:
    """Whether ``path``, with every symlink resolved, lies outside ``root`` (also resolved)."""
    real, base = os.path.realpath(path), os.path.realpath(root)
    return os.path.commonpath([real, base]) != base


def _kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def read_bytes(path: Path, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES, root: Path | None = None) -> bytes:
    """The bytes of a regular file, read without blocking and without reading more than ``max_bytes + 1``.

    Args:
        path: the file.
        max_bytes: the most bytes an image may have.
        root: when given, the file (symlinks resolved) must lie inside this folder.

    Raises:
        ImageProblem: outside ``root``, missing, not a regular file (a FIFO, a device, a folder), unreadable,
            or larger than ``max_bytes``.
    """
    if root is not None and outside_root(path, root):
        raise ImageProblem(f"outside the images root {root} (pass --allow-outside-root to allow it)")
    try:
        st = os.stat(path)  # no open yet: opening a FIFO or a device may block or act on it
    except FileNotFoundError:
        raise ImageProblem("image file not found") from None
    except OSError as exc:
        raise ImageProblem(f"cannot read image file ({exc.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageProblem("is a directory, not an image")
    if not stat.S_ISREG(st.st_mode):
        raise ImageProblem(f"not a regular file ({_kind(st.st_mode)})")
    too_big = f"image file is larger than the limit of {format_bytes(max_bytes)} (raise it with --max-image-bytes)"
    if st.st_size > max_bytes:
        raise ImageProblem(too_big)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise ImageProblem("image file not found") from None
        raise ImageProblem(f"cannot read image file ({exc.strerror})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # replaced between the stat and the open
            raise ImageProblem(f"not a regular file ({_kind(os.fstat(fd).st_mode)})")
        chunks, total = [], 0
        while total <= max_bytes:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as exc:
        raise ImageProblem(f"cannot read image file ({exc.strerror})") from None
    finally:
        os.close(fd)
    if total > max_bytes:  # the file grew after the stat
        raise ImageProblem(too_big)
    return b"".join(chunks)


def read_image(path: Path, *, root: Path | None = None, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> ImageInfo:
    """Read an image file and decode it once to prove it is whole.

    The size declared by the header is checked against the pixel limit (:func:`vlkit.data.decode.max_pixels`)
    before any pixel is decoded. JPEGs are decoded in draft mode at 1/8 scale: every entropy-coded byte is
    still read, so truncation and corruption are caught, at a fraction of the cost of a full decode.

    Args:
        path: the image file.
        root: when given, the file must lie inside this folder (symlinks resolved).
        max_bytes: the most bytes the file may have.

    Raises:
        ImageProblem: outside ``root``, missing, not a regular file, too large (bytes or pixels), empty, not an
            image, truncated or corrupt.
    """
    return check_image(read_bytes(path, max_bytes, root))


def check_image(data: bytes) -> ImageInfo:
    """Decode encoded image bytes once to prove they are whole (as :func:`read_image` does for a file).

    Raises:
        ImageProblem: too many pixels, empty, not an image, truncated or corrupt.
    """
    if not data:
        raise ImageProblem("empty image file (0 bytes)")
    try:
        img = open_image(data)
        width, height, fmt = img.width, img.height, img.format or "unknown"
        if fmt == "JPEG":
            img.draft(img.mode, (max(1, width // 8), max(1, height // 8)))
        load_image(img)
    except ImageTooLarge as exc:
        raise ImageProblem(str(exc)) from None
    except ImageDecodeError as exc:
        reason = str(exc)
        if not reason.startswith(("not an image", "truncated or corrupt")):  # a header cut short or damaged
            reason = f"truncated or corrupt image ({reason})"
        raise ImageProblem(reason) from None
    except (OSError, SyntaxError, ValueError) as exc:  # from draft()
        raise ImageProblem(f"truncated or corrupt image ({exc})") from None
    if width < 1 or height < 1:
        raise ImageProblem(f"image has no pixels ({width}x{height})")
    return ImageInfo(data=data, width=width, height=height, format=fmt)
