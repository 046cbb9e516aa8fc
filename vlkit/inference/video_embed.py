"""The image side of a two-tower model over videos: each video's embedding is the mean of its frames'.

Retrieval evaluation, ``vlkit index`` and search all take their image-side vectors from
:func:`vlkit.inference.embed.compute_embeddings`; this module is what that function uses when the rows are
videos. The rule that decides it (:func:`resolve_frames`):

* a dataset with a ``video`` column (made by ``vlkit ingest`` from video files or by ``vlkit data synth --kind
  video``) is a video dataset, read as videos with :data:`DEFAULT_FRAMES` frames unless told otherwise;
* ``frames=N`` (``--frames N``) reads ``N`` frames per video; ``frames=0`` reads the ``image`` column (each
  video's middle frame, stored at ingest) as images.

A video gives ``N`` frames, one at the centre of each of ``N`` equal segments
(:func:`vlkit.data.video.sample_indices`, decoded with keyframe seeks by
:class:`~vlkit.data.video_dataset.LanceVideoDataset`: only the frames needed), through the model's evaluation
image transform; each frame is embedded by the image tower and L2-normalised, and the normalised mean of the
frames is the video's embedding (:func:`vlkit.models.video_two_tower.pool_frames`, CLIP4Clip's meanP). With
identical frames the video's embedding is that frame's image embedding. Every caption of a video is embedded,
as for images, and a thumbnail comes from the middle frame ingest stored in the ``image`` column.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from vlkit.data.dataset import CaptionMode, EpochBatch, LanceImageTextDataset
from vlkit.data.decode import ImageDecodeError, decode_rgb
from vlkit.data.rows import image_error, reading
from vlkit.data.store import OpenedDataset, open_dataset, split_indices
from vlkit.data.text import TextTokenizer
from vlkit.data.transforms import ImageTransform, thumbnail_jpeg
from vlkit.data.video_dataset import LanceVideoDataset
from vlkit.errors import DataError, VlkitError
from vlkit.inference.speed import to_channels_last
from vlkit.models.video_two_tower import pool_frames

DEFAULT_FRAMES = 8
"""Frames sampled per video when the dataset is a video dataset and no number is given."""
MAX_FRAMES = 64
"""The most frames per video ``--frames`` accepts (every one goes through the image tower)."""


def is_video_dataset(dataset: str | Path | OpenedDataset) -> bool:
    """Whether ``dataset`` holds videos (a ``video`` column)."""
    return "video" in open_dataset(dataset).schema.names


def resolve_frames(dataset: str | Path | OpenedDataset, frames: int | None) -> int:
    """The frames per video to embed ``dataset`` with: 0 reads its images.

    Args:
        dataset: the Lance dataset.
        frames: ``None``: :data:`DEFAULT_FRAMES` for a video dataset, 0 for an image dataset; 0: images (a
            video's middle frame); ``N``: ``N`` uniformly sampled frames per video.

    Raises:
        VlkitError: ``frames`` negative or above :data:`MAX_FRAMES`.
        DataError: ``frames`` above 0 for a dataset without videos.
    """
    if frames is not None and (isinstance(frames, bool) or not isinstance(frames, int)
                               or not 0 <= frames <= MAX_FRAMES):
        raise VlkitError(f"--frames must be an integer from 0 (read the images) to {MAX_FRAMES}, got {frames!r}")
    video = is_video_dataset(dataset)
    if frames is None:
        return DEFAULT_FRAMES if video else 0
    if frames and not video:
        raise DataError(f"{dataset}: no videos (column 'video'), so --frames {frames} has nothing to sample; "
                        "leave --frames out to embed its images")
    return frames


def require_videos(dataset: str | Path | OpenedDataset, split: str | None, limit: int | None = None) -> int:
    """Check, before any frame is decoded, that every row of ``split`` (its first ``limit``) holds a video.

    Returns:
        The number of videos.

    Raises:
        DataError: no ``video`` column, or the first row without a video (named), with what to do about it.
    """
    ds = open_dataset(dataset)
    if "video" not in ds.schema.names:
        raise DataError(f"{dataset}: no videos (column 'video')")
    offsets = dataset.split(split) if isinstance(dataset, OpenedDataset) else split_indices(ds, split)
    offsets = offsets[:limit]
    table = ds.take(offsets, columns=["id", "video"])  # blob descriptions, not the bytes
    videos = table.column("video")
    for i, row_id in enumerate(table.column("id").to_pylist()):
        if not videos[i].is_valid:
            where = f" of split '{split}'" if split else ""
            raise DataError(f"{dataset}: row {row_id!r}{where} has no video; embed the rows' images instead "
                            "with --frames 0")
    return len(offsets)


class VideoEmbedDataset(LanceVideoDataset):
    """What embedding a video dataset reads per batch: the uniformly sampled frames of each video (evaluation
    sampling, one clip), every caption, and a thumbnail of the middle frame stored in the ``image`` column.

    Its batches have the keys of :class:`~vlkit.data.dataset.LanceImageTextDataset`'s, with ``image`` holding
    the videos ``[batch, frames, 3, H, W]``: ``id``, ``index``, ``text``, ``caption_image`` (with
    ``captions="all"``), ``input_ids``/``attention_mask`` (with a tokenizer), ``label``, ``thumbnail`` and the
    extra columns.

    Args:
        path: the Lance dataset.
        split: the split to read (``None``: every row).
        transform: the model's evaluation image transform (every frame goes through it).
        num_frames: frames per video.
        tokenizer: tokenizes the captions.
        captions: ``all`` (every caption, flattened) or ``none``.
        columns: further columns to return as lists.
        thumbnails: also return a JPEG thumbnail of each video's middle frame with this longer side.
    """

    def __init__(self, path: str | Path | OpenedDataset, split: str | None, transform: ImageTransform,
                 num_frames: int = DEFAULT_FRAMES, tokenizer: TextTokenizer | None = None,
                 captions: CaptionMode = "all", columns: Sequence[str] = (), thumbnails: int | None = None):
        if captions not in ("all", "none"):
            raise DataError(f"embedding videos reads all captions or none, not '{captions}'")
        if transform.train:
            raise DataError("embedding videos needs the evaluation transform")
        if thumbnails is not None and thumbnails < 1:
            raise DataError("thumbnails need a positive size")
        super().__init__(path, split, transform, num_frames=num_frames, train=False, clips=1, captions="none",
                         columns=columns)
        self.all_captions = captions == "all"
        self.caption_tokenizer = tokenizer
        self.thumbnails = thumbnails

    def __getitems__(self, indices: Sequence[int] | EpochBatch) -> dict[str, Any]:
        """One batch of videos (see the class description for its keys)."""
        batch = super().__getitems__(indices)
        batch["image"] = batch.pop("video")  # [batch, frames, 3, S, S]
        del batch["clip_video"], batch["frame_index"]
        if "class_name" not in self.columns:
            del batch["class_name"]
        positions = indices.indices if isinstance(indices, EpochBatch) else indices
        offsets = [self.offsets[i] for i in positions]
        with reading(self.path):
            ds = self._dataset()
            captions = ds.take(offsets, columns=["captions"]).column("captions").to_pylist()
            middles = ds.read_blobs("image", indices=offsets, preserve_order=True) if self.thumbnails else []
        if self.all_captions:
            texts, owner = [], []
            for pos, caps in enumerate(captions):
                texts += caps or []
                owner += [pos] * len(caps or [])
            batch["text"] = texts
            batch["caption_image"] = torch.tensor(owner, dtype=torch.long)
            if self.caption_tokenizer is not None:
                batch.update(self.caption_tokenizer(texts))
        if self.thumbnails:
            batch["thumbnail"] = [self._thumbnail(data, row_id) for (_, data), row_id in zip(middles, batch["id"])]
        return batch

    def _thumbnail(self, data: bytes, row_id: str) -> bytes:
        try:
            return thumbnail_jpeg(decode_rgb(data, draft=self.thumbnails), self.thumbnails)
        except ImageDecodeError as exc:
            raise image_error(self.path, row_id, exc) from None


def image_side_dataset(dataset: str | Path | OpenedDataset, split: str | None, transform: ImageTransform,
                       tokenizer: TextTokenizer | None, captions: bool, columns: Sequence[str],
                       thumbnails: int | None, frames: int) -> LanceImageTextDataset:
    """The dataset whose batches' ``image`` is what the image tower embeds: images (``frames=0``) or videos of
    ``frames`` frames (:class:`VideoEmbedDataset`)."""
    if frames:
        return VideoEmbedDataset(dataset, split, transform, frames, tokenizer, "all" if captions else "none",
                                 columns, thumbnails)
    return LanceImageTextDataset(dataset, split, transform, tokenizer, captions="all" if captions else "none",
                                 columns=columns, thumbnails=thumbnails)


def encode_pixels(model: Any, pixels: Tensor, channels_last: bool = False) -> Tensor:
    """The image-side embeddings of a batch: of images ``[batch, 3, H, W]``, or of videos
    ``[batch, frames, 3, H, W]`` (every frame through ``model.encode_image``, L2-normalised, mean-pooled and
    normalised again).

    Args:
        model: a model with ``encode_image``.
        pixels: the normalised images or videos.
        channels_last: give convolutions NHWC frames.

    Returns:
        ``[batch, embed_dim]`` in float32.
    """
    if pixels.dim() == 5:
        frames = pixels.flatten(0, 1)  # [batch * frames, 3, H, W], video by video
        embeds = model.encode_image(to_channels_last(frames) if channels_last else frames).float()
        return pool_frames(F.normalize(embeds, dim=-1), pixels.shape[1])  # [batch, embed_dim]
    return model.encode_image(to_channels_last(pixels) if channels_last else pixels).float()


def video_metric_names(metrics: dict[str, float]) -> dict[str, float]:
    """Retrieval metric names for videos: ``t2i_*`` become ``t2v_*`` and ``i2t_*`` become ``v2t_*``."""
    out = {}
    for key, value in metrics.items():
        head, _, name = key.rpartition("/")
        for old, new in (("t2i_", "t2v_"), ("i2t_", "v2t_")):
            if name.startswith(old):
                name = new + name[len(old):]
        out[f"{head}/{name}" if head else name] = value
    return out


def retrieval_frames(dataset: OpenedDataset, split: str, frames: int | None, limit: int | None = None,
                     rerank: int | None = None) -> int:
    """The frames per video retrieval evaluation reads (0: images), checked before the model is loaded.

    Raises:
        VlkitError: a bad ``frames``, or re-ranking asked for videos (the matching head reads one image).
        DataError: ``frames`` for a dataset without videos, or a row of the split without a video.
    """
    frames = resolve_frames(dataset, frames)
    if frames and rerank is not None:
        raise VlkitError("--rerank re-scores images with a matching head, not videos; leave it out, or evaluate "
                         "the videos' middle frames as images with --frames 0")
    if frames:
        require_videos(dataset, split, limit)
    return frames
