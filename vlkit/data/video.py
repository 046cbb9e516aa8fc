"""Video files with PyAV: what a video holds (read once at ingest), frame sampling, and decoding chosen frames.

Frames are numbered in presentation order, 0 to ``frames - 1``, from the video stream's packets (demuxing
reads no pixels). :func:`decode_frames` decodes only what the asked frames need: for each it seeks to the
nearest keyframe at or before it and decodes forward, going on without a seek when the next asked frame lies
before the next keyframe.

Sampling follows TSN and TimeSformer (:func:`sample_indices`): the video is cut into ``N`` equal segments and
one frame is taken from each, at random within the segment for training, at the segment's centre for
evaluation; ``clips=K`` evaluation clips shift the pick to ``K`` evenly spaced offsets inside every segment.

PyAV (``av``) is an optional dependency (``pip install 'vlkit[video]'``), imported when a video is first read.
"""

from __future__ import annotations

import bisect
import io
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlkit.errors import DataError

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".webm", ".avi", ".mkv")
DEFAULT_MAX_FRAMES = 36_000
"""The most frames a video may have at ingest (20 minutes at 30 frames/s)."""
DEFAULT_MAX_SECONDS = 3600.0
"""The longest video accepted at ingest, in seconds."""


class VideoError(DataError):
    """Bytes that cannot be used as a video (not a video, no video stream, truncated, over a limit).

    Attributes:
        reason: why, for messages that name the file or the dataset row.
    """

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


def require_av() -> Any:
    """The ``av`` module, or a :class:`~vlkit.errors.DataError` saying how to install it."""
    try:
        import av
    except ImportError:
        raise DataError("reading videos needs PyAV: pip install 'vlkit[video]' (or pip install av)") from None
    return av


def is_video_path(path: str | Path) -> bool:
    """Whether a file name has a video extension (:data:`VIDEO_SUFFIXES`)."""
    return Path(str(path)).suffix.lower() in VIDEO_SUFFIXES


@dataclass
class VideoMeta:
    """What a video holds, as read at ingest.

    Attributes:
        width: frame width in pixels.
        height: frame height in pixels.
        frames: frames that decode.
        fps: average frames per second of the video stream.
        duration: seconds, ``frames / fps``.
        codec: the video stream's codec (``h264``, ``mpeg4``, ``vp9``, ...).
        container: the container format (``mov,mp4,m4a,3gp,3g2,mj2``, ``matroska,webm``, ``avi``, ...).
    """

    width: int
    height: int
    frames: int
    fps: float
    duration: float
    codec: str
    container: str


def _open(data: bytes, thread_type: str = "AUTO") -> tuple[Any, Any]:
    """The container and its first video stream, or a :class:`VideoError`.

    ``thread_type``: ``AUTO`` (frame threads: fastest through a whole video) or ``SLICE`` (no frame threads: each
    seek then costs no refill of their pipeline; measured about 1.5x faster than ``AUTO`` for 8 frames of a 10 s
    320x240 H.264 video with a keyframe every 30 frames).
    """
    av = require_av()
    if not data:
        raise VideoError("empty video file (0 bytes)")
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.FFmpegError, ValueError, OSError) as exc:
        raise VideoError(f"not a readable video ({_reason(exc)})") from None
    if not container.streams.video:
        container.close()
        raise VideoError("no video stream in the file")
    stream = container.streams.video[0]
    stream.thread_type = thread_type
    return container, stream


def _reason(exc: Exception) -> str:
    text = getattr(exc, "strerror", None) or str(exc)
    return text.split(": '<", 1)[0].strip() or type(exc).__name__


def _check_size(stream: Any, max_pixels: int | None) -> tuple[int, int]:
    from vlkit.data.decode import ImageTooLarge, check_pixels

    width, height = stream.codec_context.width, stream.codec_context.height
    if not width or not height:
        raise VideoError("the video stream declares no frame size")
    try:
        check_pixels(width, height, max_pixels)
    except ImageTooLarge as exc:
        raise VideoError(f"video frames: {exc}") from None
    return width, height


def _fps(stream: Any, frames: int, pts: list[int]) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if rate:
        return float(rate)
    if len(pts) > 1 and stream.time_base:  # no declared rate: from the span of the timestamps
        return (len(pts) - 1) / float((pts[-1] - pts[0]) * stream.time_base)
    return 0.0


def probe_video(data: bytes, max_frames: int = DEFAULT_MAX_FRAMES, max_seconds: float = DEFAULT_MAX_SECONDS,
                max_pixels: int | None = None) -> tuple[VideoMeta, Any]:
    """Decode a whole video once to prove it is whole, and return what it holds and its middle frame.

    The frame size is checked against the pixel limit, and the declared frame count and duration against
    theirs, before any frame is decoded; decoding stops as soon as more frames than ``max_frames`` appear.

    Args:
        data: the encoded video (any container and codec FFmpeg reads).
        max_frames: the most frames the video may have.
        max_seconds: the longest the video may be.
        max_pixels: the most pixels per frame (default: :func:`vlkit.data.decode.max_pixels`).

    Returns:
        The video's :class:`VideoMeta` and its middle frame as an RGB ``PIL.Image``.

    Raises:
        VideoError: not a video, no video stream, over a limit, truncated or corrupt.
    """
    av = require_av()
    container, stream = _open(data)
    try:
        width, height = _check_size(stream, max_pixels)
        declared = stream.frames or 0
        if declared > max_frames:
            raise VideoError(f"{declared} frames is over the limit of {max_frames}")
        if _declared_seconds(container, stream) > max_seconds:
            raise VideoError(f"{_declared_seconds(container, stream):.0f} s is over the limit of {max_seconds:.0f} s")
        pts, middle = [], None
        try:
            for frame in container.decode(stream):
                if (frame.width, frame.height) != (width, height):
                    _check_size_of(frame, max_pixels)
                pts.append(frame.pts)
                if len(pts) > max_frames:
                    raise VideoError(f"more than {max_frames} frames (the limit)")
                if declared and len(pts) - 1 == declared // 2:
                    middle = frame.to_image()
        except av.FFmpegError as exc:
            raise VideoError(f"corrupt or truncated video ({_reason(exc)}) after {len(pts)} frames") from None
        if not pts:
            raise VideoError("no frame decodes (truncated or corrupt video)")
        if declared and len(pts) < declared:
            raise VideoError(f"truncated video: {len(pts)} of its {declared} frames decode")
        fps = _fps(stream, len(pts), [p for p in pts if p is not None])
        declared_s = _declared_seconds(container, stream)
        if not declared and fps and declared_s and len(pts) < declared_s * fps - 1.5:
            raise VideoError(f"truncated video: {len(pts)} frames decode, {declared_s:.2f} s at {fps:g} "
                             f"frames/s declared")
        meta = VideoMeta(width=width, height=height, frames=len(pts), fps=fps,
                         duration=len(pts) / fps if fps else 0.0, codec=stream.codec_context.name,
                         container=container.format.name)
        if meta.duration > max_seconds:
            raise VideoError(f"{meta.duration:.0f} s is over the limit of {max_seconds:.0f} s")
    finally:
        container.close()
    if middle is None:  # the header declared no frame count (or another one): decode to the middle
        middle = decode_frames(data, [meta.frames // 2], max_pixels=max_pixels)[0]
    return meta, middle


def _declared_seconds(container: Any, stream: Any) -> float:
    """The duration the stream (else the container) declares, in seconds (0 when none)."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    return container.duration / 1_000_000 if container.duration else 0.0


def _check_size_of(frame: Any, max_pixels: int | None) -> None:
    from vlkit.data.decode import ImageTooLarge, check_pixels

    try:
        check_pixels(frame.width, frame.height, max_pixels)
    except ImageTooLarge as exc:
        raise VideoError(f"video frames: {exc}") from None


def frame_index(data: bytes) -> tuple[list[int], list[int]]:
    """The presentation timestamps of a video's frames, in order, and those of its keyframes (from packets).

    Raises:
        VideoError: not a video, or a video stream without timestamps.
    """
    av = require_av()
    container, stream = _open(data)
    pts, keys = [], []
    try:
        for packet in container.demux(stream):
            if packet.pts is None:
                if packet.size:
                    raise VideoError("the video's packets carry no timestamps, so frames cannot be sought")
                continue
            pts.append(packet.pts)
            if packet.is_keyframe:
                keys.append(packet.pts)
    except av.FFmpegError as exc:
        raise VideoError(f"corrupt or truncated video ({_reason(exc)})") from None
    finally:
        container.close()
    if not pts:
        raise VideoError("no frame in the video stream")
    pts.sort()
    keys.sort()
    if not keys or keys[0] > pts[0]:
        keys.insert(0, pts[0])
    return pts, keys


def decode_frames(data: bytes, indices: list[int], max_pixels: int | None = None,
                  index: tuple[list[int], list[int]] | None = None) -> list[Any]:
    """Decode the frames at ``indices`` (presentation order, repeats allowed), seeking to keyframes.

    Args:
        data: the encoded video.
        indices: frame numbers, each in ``0 .. frames - 1``.
        max_pixels: the most pixels per frame (default: :func:`vlkit.data.decode.max_pixels`).
        index: the video's :func:`frame_index`, when already read.

    Returns:
        One RGB ``PIL.Image`` per index, in the order of ``indices``.

    Raises:
        VideoError: not a video, an index outside the video, over the pixel limit, or a frame that does not
            decode.
    """
    av = require_av()
    pts, keys = index if index is not None else frame_index(data)
    bad = [i for i in indices if not 0 <= i < len(pts)]
    if bad:
        raise VideoError(f"frame {bad[0]} is outside the video's {len(pts)} frames")
    wanted = sorted(set(pts[i] for i in indices))
    found: dict[int, Any] = {}
    container, stream = _open(data, "SLICE")
    try:
        _check_size(stream, max_pixels)
        frames, last = None, None
        for target in wanted:
            key = keys[bisect.bisect_right(keys, target) - 1]
            if frames is None or last is None or last >= target or key > last:
                container.seek(key, backward=True, any_frame=False, stream=stream)
                frames, last = container.decode(stream), None
            for frame in frames:
                if frame.pts is None:
                    continue
                last = frame.pts
                if frame.pts >= target:
                    found[target] = frame.to_image()
                    break
            else:
                frames = None
            if target not in found:
                raise VideoError(f"frame at timestamp {target} does not decode (truncated or corrupt video)")
    except av.FFmpegError as exc:
        raise VideoError(f"corrupt or truncated video ({_reason(exc)})") from None
    finally:
        container.close()
    return [found[pts[i]] for i in indices]


def sample_indices(frames: int, num: int, train: bool, rng: random.Random | None = None, clip: int = 0,
                   clips: int = 1) -> list[int]:
    """The frames of one clip: one from each of ``num`` equal segments of a ``frames``-frame video (TSN).

    Segment ``i`` covers frames ``i * frames // num`` to ``(i + 1) * frames // num - 1``. Training takes a
    frame at random inside each segment; evaluation clip ``k`` of ``clips`` takes the frame at fraction
    ``(k + 0.5) / clips`` of each segment (with one clip, its centre). A video shorter than ``num`` frames
    repeats frames.

    Args:
        frames: frames in the video.
        num: frames per clip (segments).
        train: random (training) or fixed (evaluation) positions.
        rng: the source of randomness for training.
        clip: which evaluation clip, ``0 .. clips - 1``.
        clips: evaluation clips per video.

    Returns:
        ``num`` frame numbers, non-decreasing.

    Raises:
        DataError: no frames, ``num`` or ``clips`` below 1, ``clip`` out of range, or training without ``rng``.
    """
    if frames < 1 or num < 1 or clips < 1 or not 0 <= clip < clips:
        raise DataError(f"cannot sample {num} frames (clip {clip} of {clips}) from a video of {frames} frames")
    out = []
    for i in range(num):
        if train:
            if rng is None:
                raise DataError("training frame sampling needs an rng (random.Random)")
            lo, hi = i * frames // num, (i + 1) * frames // num
            out.append(lo + rng.randrange(hi - lo) if hi > lo else min(lo, frames - 1))
        else:  # floor(frames * (i + (clip + 0.5) / clips) / num), in integers
            out.append(min(frames - 1, (2 * i * clips + 2 * clip + 1) * frames // (2 * num * clips)))
    return out

