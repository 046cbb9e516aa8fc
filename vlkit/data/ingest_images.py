"""Reading the images of an ingest on worker threads, and keeping what ``--strict``'s check found.

``--strict`` checks every image before writing anything, then writes them. Each image is decoded once: the
check keeps the images it read, up to :data:`KEEP_CHECKED_BYTES` of them in all; beyond that it keeps only
what it learned (size, format) and a SHA-256 of the bytes, and the write reads those files again without
decoding them, refusing any whose bytes are no longer the ones checked.
"""

from __future__ import annotations

import functools
import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

from vlkit.data.images import (DEFAULT_MAX_IMAGE_BYTES, ImageInfo, ImageProblem, check_image, read_bytes,
                               read_image)
from vlkit.data.ingest_videos import VideoInfo, read_video
from vlkit.data.records import Problem, Record
from vlkit.data.video import is_video_path

KEEP_CHECKED_BYTES = 256 * 1024 * 1024
"""The most image bytes ``--strict`` holds in memory between its check and the write."""


@dataclass
class CheckedImage:
    """An image the check found whole, whose bytes were not kept: what the write needs besides them."""

    width: int
    height: int
    format: str
    sha256: bytes


def _read(rec: Record, prior: ImageInfo | CheckedImage | None, confine: bool,
          max_bytes: int) -> ImageInfo | ImageProblem:
    """``rec``'s image: ``prior`` when it holds the bytes, else read (and decoded only if never checked); a
    row's second image (``rec.image2_path``) is read and decoded beside it, under the same root and limits."""
    first = _read_first(rec, prior, confine, max_bytes)
    if rec.image2_path is None or isinstance(first, ImageProblem) or first.second is not None:
        return first
    try:
        first.second = read_image(rec.image2_path, root=rec.root if confine else None, max_bytes=max_bytes)
    except ImageProblem as exc:
        return ImageProblem(f"second image {rec.image2_path}: {exc}")
    return first


def _read_first(rec: Record, prior: ImageInfo | CheckedImage | None, confine: bool,
                max_bytes: int) -> ImageInfo | ImageProblem:
    if isinstance(prior, ImageInfo):
        return prior
    root = rec.root if confine else None
    if rec.image_data is None and is_video_path(rec.image_path):  # decoded again: its frame and metadata
        try:
            video = read_video(rec.image_path, root=root, max_bytes=max_bytes)
        except ImageProblem as exc:
            return exc
        if prior is not None and hashlib.sha256(video.video).digest() != prior.sha256:
            return ImageProblem("the video file changed during the ingest (after it was checked)")
        return video
    try:
        if rec.image_data is not None:  # a source holding the bytes (tar shard, Parquet, HF dataset)
            data = rec.image_data(max_bytes)
            if prior is None:
                return check_image(data)
        elif prior is None:
            return read_image(rec.image_path, root=root, max_bytes=max_bytes)
        else:
            data = read_bytes(rec.image_path, max_bytes, root)
    except ImageProblem as exc:
        return exc
    if hashlib.sha256(data).digest() != prior.sha256:
        return ImageProblem("the image file changed during the ingest (after it was checked)")
    return ImageInfo(data=data, width=prior.width, height=prior.height, format=prior.format)


def decoded(records: Sequence[Record], workers: int, chunk: int, confine: bool = True,
            max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
            checked: list[ImageInfo | CheckedImage] | None = None) -> Iterator[tuple[Record, object]]:
    """(record, ImageInfo or ImageProblem) in input order, reading on ``workers`` threads.

    Args:
        records: the records whose images to read.
        workers: reading threads.
        chunk: records handed to the threads at a time (bounds the images held at once).
        confine: read only inside each record's images root.
        max_bytes: the largest image file read.
        checked: what :func:`keep_checked` returned for the same records; its entries are let go as they
            are handed on.
    """
    read = functools.partial(_read, confine=confine, max_bytes=max_bytes)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, len(records), chunk):
            part = records[start : start + chunk]
            priors = checked[start : start + chunk] if checked is not None else [None] * len(part)
            if checked is not None:
                checked[start : start + chunk] = [None] * len(part)
            yield from zip(part, pool.map(read, part, priors))


def _held(image: ImageInfo) -> int:
    """The bytes a checked image (with its second image, or its video) holds in memory."""
    return (len(image.data) + len(image.second.data if image.second else b"")
            + len(image.video if isinstance(image, VideoInfo) else b""))


def keep_checked(found: Iterator[tuple[Record, object]], problems: list[Problem],
                 problem: Callable[[Record, ImageProblem], Problem],
                 keep_bytes: int | None = None) -> list[ImageInfo | CheckedImage | None]:
    """Gather a checking pass: report its problems, keep its images (or their digests past ``keep_bytes``).

    Args:
        found: ``(record, ImageInfo or ImageProblem)`` pairs, as :func:`decoded` gives them.
        problems: where each problem is reported, made by ``problem``.
        problem: builds the report entry of a record's problem.
        keep_bytes: the most image bytes kept (default :data:`KEEP_CHECKED_BYTES`).

    Returns:
        One entry per record, in order: the image, a :class:`CheckedImage`, or None for a problem.
    """
    budget = KEEP_CHECKED_BYTES if keep_bytes is None else keep_bytes
    kept, out = 0, []
    for rec, image in found:
        if isinstance(image, ImageProblem):
            problems.append(problem(rec, image))
            out.append(None)
        elif kept + _held(image) <= budget:
            kept += _held(image)
            out.append(image)
        else:
            original = image.video if isinstance(image, VideoInfo) else image.data  # a video's file, not its frame
            out.append(CheckedImage(image.width, image.height, image.format, hashlib.sha256(original).digest()))
    return out
