"""Reading video files at ingest: the original bytes, what the video holds, and a middle-frame JPEG.

A video row keeps every column an image row has, so every image tool (``vlkit data show``, contact sheets,
thumbnails, search pages) works on it: ``image`` holds a JPEG of the video's middle frame at the video's size,
and ``width``/``height`` are the frame size. The original file is in the ``video`` blob, with ``fps``,
``frames``, ``duration``, ``video_codec`` and ``video_format`` read once here (:data:`VIDEO_FIELDS` of
:mod:`vlkit.data.schema`).

A video file is read like an image file (inside its root, a regular file, up to ``--max-image-bytes``), its
frame size checked against the pixel limit and its length against :data:`~vlkit.data.video.DEFAULT_MAX_FRAMES`
and :data:`~vlkit.data.video.DEFAULT_MAX_SECONDS`, and decoded once in full to prove it is whole.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from vlkit.data.images import DEFAULT_MAX_IMAGE_BYTES, ImageInfo, ImageProblem, read_bytes
from vlkit.data.video import VideoError, VideoMeta, probe_video
from vlkit.errors import DataError

THUMBNAIL_QUALITY = 90
"""JPEG quality of the middle frame stored in a video row's ``image``."""


@dataclass
class VideoInfo(ImageInfo):
    """A video read at ingest: ``data`` is its middle frame as JPEG, ``video`` the original file's bytes."""

    video: bytes = b""
    meta: VideoMeta | None = None


def check_video(data: bytes) -> VideoInfo:
    """Decode a video's bytes once in full and make the row's middle-frame JPEG.

    Raises:
        ImageProblem: not a video, truncated or corrupt, or over a limit (frames, seconds, pixels per frame).
    """
    try:
        meta, middle = probe_video(data)
    except VideoError as exc:
        raise ImageProblem(exc.reason) from None
    except DataError as exc:  # PyAV is missing: the same line for every video
        raise ImageProblem(str(exc)) from None
    buf = io.BytesIO()
    middle.convert("RGB").save(buf, "JPEG", quality=THUMBNAIL_QUALITY)
    return VideoInfo(data=buf.getvalue(), width=meta.width, height=meta.height, format="JPEG", video=data,
                     meta=meta)


def read_video(path: Path, *, root: Path | None = None, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> VideoInfo:
    """Read a video file (inside ``root``, at most ``max_bytes``) and check it with :func:`check_video`.

    Raises:
        ImageProblem: outside ``root``, missing, not a regular file, too large, or not a whole video.
    """
    return check_video(read_bytes(path, max_bytes, root))


def video_columns(info: ImageInfo) -> dict:
    """The video columns of a row read from ``info`` (none for an image)."""
    if not isinstance(info, VideoInfo) or info.meta is None:
        return {}
    meta = info.meta
    return {"video": info.video, "fps": meta.fps, "frames": meta.frames, "duration": meta.duration,
            "video_codec": meta.codec, "video_format": meta.container}
