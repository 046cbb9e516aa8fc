"""A map-style PyTorch dataset of video clips from a vlkit Lance dataset (rows with a ``video`` blob).

Each video gives ``num_frames`` frames, one from each of ``num_frames`` equal segments
(:func:`vlkit.data.video.sample_indices`: at random within each segment for training, at evenly spaced offsets
for evaluation), decoded with keyframe seeks so only the frames needed are decoded, and cropped and resized by
the image transform with one crop (and one flip) for every frame of a clip. Batches are read and decoded a
whole batch per call, and loaded with :func:`vlkit.data.dataset.make_loader`, as images are.

Every random choice (caption, frames, crop, flip) comes from a generator seeded by ``(seed, epoch, row)``, in
that order, so a sample is the same whichever worker loads it.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Sequence

import lance
import numpy as np
import torch

from vlkit.data.dataset import CaptionMode, EpochBatch, LanceImageTextDataset
from vlkit.data.rows import image_error, reading
from vlkit.data.text import TextTokenizer
from vlkit.data.transforms import (BICUBIC, ImageTransform, eval_crop_box, hflip, mentions_side,
                                   random_resized_crop_box)
from vlkit.data.video import VideoError, decode_frames, frame_index, sample_indices
from vlkit.errors import DataError


def transform_frames(frames: list[Any], transform: ImageTransform, rng: random.Random | None,
                     allow_flip: bool = True) -> torch.Tensor:
    """Crop and resize the frames of one clip with one box (and one flip) for all, as ``transform`` does an image.

    Evaluation resizes the shorter side to ``transform.image_size`` and takes the centre; training draws one
    random resized crop and one flip (the same draws :class:`~vlkit.data.transforms.ImageTransform` makes).

    Args:
        frames: RGB ``PIL.Image`` frames of one size.
        transform: the image transform whose size, crop range and flip rule apply.
        rng: the source of randomness, for a training transform.
        allow_flip: False to never mirror the clip (its caption or class says left or right).

    Returns:
        uint8 tensor ``[frames, 3, S, S]``.
    """
    width, height = frames[0].size
    flip = False
    if transform.train:
        if rng is None:
            raise DataError("a training transform needs an rng (random.Random)")
        left, top, crop_w, crop_h = random_resized_crop_box(width, height, rng, transform.scale, transform.ratio)
        box = (left, top, left + crop_w, top + crop_h)
        flip = transform.flip and allow_flip and rng.random() < 0.5
    else:
        box = eval_crop_box(width, height, transform.image_size)
    size = (transform.image_size, transform.image_size)
    out = []
    for frame in frames:
        img = frame.convert("RGB").resize(size, BICUBIC, box=box)
        out.append(np.asarray(hflip(img) if flip else img, dtype=np.uint8))  # [S, S, 3]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()  # [frames, 3, S, S], one copy


class LanceVideoDataset(LanceImageTextDataset):
    """Clips of the videos of one split of a Lance dataset, batched at read time.

    Args:
        path: the Lance dataset (made by ``vlkit ingest`` from videos, or ``vlkit data synth --kind video``).
        split: the split to read (``None``: every row).
        transform: crops and resizes the frames (its ``image_size``, and for training its crop range and flip).
        num_frames: frames per clip ``N`` (one from each of ``N`` equal segments of the video).
        train: random frames within each segment (training) or fixed ones (evaluation); default: as
            ``transform.train``.
        clips: evaluation clips per video ``K``, at ``K`` evenly spaced offsets within the segments. With
            ``K > 1`` a batch of ``B`` videos holds ``B * K`` clips, video by video, and ``clip_video`` maps each
            clip to its video's position in the batch (average the clips' scores per video).
        tokenizer: if given, batches carry ``input_ids`` and ``attention_mask``.
        captions: as :class:`~vlkit.data.dataset.LanceImageTextDataset` (``none`` for labels only).
        seed: seed of the per-sample random choices.
        normalize: float clips normalised with the transform's mean/std (else uint8).
        columns: further columns to return as lists.

    A batch (``dataset[[0, 1, 2]]``, or one from :func:`~vlkit.data.dataset.make_loader`) holds:
    ``video`` ``[batch * clips, frames, 3, H, W]`` (float, normalised like images), ``frame_index``
    ``[batch * clips, frames]`` (the frame numbers taken), ``clip_video`` ``[batch * clips]``, ``label``
    ``[batch]`` (when every row has one), ``id``, ``index``, ``text`` (with captions) and ``class_name``.

    Example:
        >>> ds = LanceVideoDataset("shapes.lance", "train", ImageTransform(64, train=True), num_frames=8,
        ...                        captions="none")
        >>> batch = next(iter(make_loader(ds, batch_size=4)))
        >>> batch["video"].shape  # [4, 8, 3, 64, 64]
    """

    def __init__(
        self,
        path: str | Path,
        split: str | None = "train",
        transform: ImageTransform | None = None,
        num_frames: int = 8,
        train: bool | None = None,
        clips: int = 1,
        tokenizer: TextTokenizer | None = None,
        captions: CaptionMode = "none",
        seed: int = 0,
        normalize: bool = True,
        columns: Sequence[str] = (),
    ):
        if transform is None:
            raise DataError("a video dataset needs an image transform (the frames' size and crop)")
        if num_frames < 1 or clips < 1:
            raise DataError(f"num_frames and clips must be at least 1, got {num_frames} and {clips}")
        if captions == "all":
            raise DataError("video datasets take one caption per clip (random, first, longest or none)")
        self.num_frames, self.clips = num_frames, clips
        self.train = transform.train if train is None else train
        if self.train and clips > 1:
            raise DataError("several clips per video are for evaluation (train=False)")
        super().__init__(path, split, transform, tokenizer, captions, seed, normalize, columns)

    def _check_rows(self, ds: lance.LanceDataset, columns: Sequence[str], require: Sequence[str]) -> None:
        if "video" not in ds.schema.names:
            raise DataError(f"{self.path}: no videos (column 'video'); ingest video files to make one")
        super()._check_rows(ds, columns, require)
        videos = ds.to_table(columns=["video"]).column("video")  # blob descriptions, not the bytes
        self.offsets = [i for i in self.offsets if videos[i].is_valid]
        if not self.offsets:
            raise DataError(f"{self.path}: no rows of split '{self.split}' hold a video")

    def _decode(self, data: bytes, indices: list[int], index: tuple[list[int], list[int]]) -> list[Any]:
        """The frames at ``indices`` of one video (seeking to keyframes; ``index`` is its frame index)."""
        return decode_frames(data, indices, index=index)

    def __getitems__(self, indices: Sequence[int] | EpochBatch) -> dict[str, Any]:
        """One batch of clips (see the class description for its keys)."""
        if isinstance(indices, EpochBatch):
            self.epoch, indices = indices.epoch, indices.indices
        offsets = [self.offsets[i] for i in indices]
        with reading(self.path):
            ds = self._dataset()
            rows = ds.take(offsets, columns=["id", "captions", "label", "class_name", *self.columns]).to_pydict()
            blobs = ds.read_blobs("video", indices=offsets, preserve_order=True)
        texts, clips, frame_numbers, clip_video = [], [], [], []
        for pos, (offset, caps, (_, data)) in enumerate(zip(offsets, rows["captions"], blobs)):
            rng = random.Random(f"{self.seed}:{self.epoch}:{offset}")
            caps = caps or []
            if self.captions == "random" and caps:
                texts.append(caps[rng.randrange(len(caps))])
            elif self.captions in ("first", "longest") and caps:
                texts.append(caps[0] if self.captions == "first" else max(caps, key=len))
            sides = [*caps, rows["class_name"][pos] or ""]
            allow_flip = not any(mentions_side(t) for t in sides)
            row_id = rows["id"][pos]
            try:
                index = frame_index(data)
                picks = [sample_indices(len(index[0]), self.num_frames, self.train, rng, k, self.clips)
                         for k in range(self.clips)]
                frames = self._decode(data, [i for p in picks for i in p], index)  # every clip at once
                for k in range(self.clips):
                    part = frames[k * self.num_frames : (k + 1) * self.num_frames]
                    clips.append(transform_frames(part, self.transform, rng, allow_flip))
                    frame_numbers.append(picks[k])
                    clip_video.append(pos)
            except VideoError as exc:
                raise image_error(self.path, row_id, exc) from None
        video = torch.stack(clips)  # [batch * clips, frames, 3, S, S] uint8
        if self.normalize:
            video = self.transform.normalize(video.flatten(0, 1)).view(video.shape)
        batch: dict[str, Any] = {
            "index": torch.tensor(list(indices), dtype=torch.long),
            "id": rows["id"],
            "video": video,
            "frame_index": torch.tensor(frame_numbers, dtype=torch.long),
            "clip_video": torch.tensor(clip_video, dtype=torch.long),
            "class_name": rows["class_name"],
        }
        if self.captions != "none":
            batch["text"] = texts
            if self.tokenizer is not None:
                batch.update(self.tokenizer(texts))
        if all(label is not None for label in rows["label"]):
            batch["label"] = torch.tensor(rows["label"], dtype=torch.long)
        for name in self.columns:
            batch[name] = rows[name]
        return batch
