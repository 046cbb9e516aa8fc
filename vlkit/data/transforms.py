"""Image transforms on Pillow, numpy and torch (no torchvision).

Decoding can use JPEG draft mode: libjpeg scales the image by 1/2, 1/4 or 1/8 while
decoding, which is much faster than decoding full size and resizing afterwards. Draft
mode is only used while the decoded image keeps enough pixels for the output size.

Transforms return uint8 ``[3, S, S]`` tensors; :func:`normalize` turns a collated uint8
batch into float32 on whatever device the batch is on, which keeps data-loader workers
cheap and moves 4x less data to the accelerator.
"""

from __future__ import annotations

import io
import math
import random
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from vlkit.data.crops import (  # noqa: F401 - the geometric transforms are part of this module's interface
    BICUBIC,
    Box,
    FloatBox,
    center_crop,
    eval_crop_box,
    hflip,
    random_resized_crop,
    random_resized_crop_box,
    resize_shorter,
)
from vlkit.data.decode import ImageDecodeError, decode_rgb_scaled
from vlkit.errors import DataError, VlkitError

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

#: Evaluation decodes in draft mode to a shorter side of at least this many times the
#: output size, so the final bicubic resize still does a little of the reduction. Measured
#: on Flickr8k photos: 1.0 gives a mean absolute difference of 1.1-1.6 (max 4.4) of 255
#: from full decoding, 2.0 gives 0.1-0.4; 1.25 lies between and still lets a 500x375
#: photo decode at half scale for outputs up to 150 px.
DRAFT_GAP = 1.25

_SIDE_WORDS = re.compile(r"\b(?:left|right)\b", re.IGNORECASE)


# --------------------------------------------------------------------------- decoding


class ImageError(DataError):
    """Encoded bytes that cannot be used as an image (corrupt, not an image, over the pixel limit).

    Attributes:
        reason: why, without the "cannot decode" prefix, for messages that name the image's row.
    """

    def __init__(self, reason: str, size: int | None = None):
        self.reason = reason
        where = f" ({size} bytes)" if size is not None else ""
        super().__init__(f"cannot decode image{where}: {reason}")


def _decode_scaled(
    data: bytes, min_size: int | None = None
) -> tuple[Image.Image, tuple[int, int], float]:
    """Decode bytes to RGB, with JPEG draft mode when ``min_size`` allows it.

    The image is opened once (:func:`vlkit.data.decode.decode_rgb_scaled`), and the size in
    its header is checked against the pixel limit before any pixel is decoded.

    Args:
        data: encoded image.
        min_size: smallest acceptable shorter side of the decoded image, or None for
            full-size decoding.

    Returns:
        The RGB image, the original (width, height), and the reduction factor draft mode
        applied (1.0 when none): original pixel coordinates divided by it give
        coordinates in the decoded image.

    Raises:
        ImageError: the bytes are not a readable image, or it has more pixels than the limit.
    """
    try:
        return decode_rgb_scaled(data, min_size)
    except ImageDecodeError as exc:
        raise ImageError(str(exc), len(data)) from None


def decode(data: bytes, min_size: int | None = None) -> Image.Image:
    """Decode an encoded image to RGB.

    Args:
        data: encoded image (JPEG, PNG, WebP, ... whatever Pillow reads).
        min_size: if given and the image is a JPEG much larger than needed, decode it
            in draft mode at 1/2, 1/4 or 1/8 scale such that the shorter side of the
            result is still at least ``min_size``. Other formats decode at full size.

    Returns:
        The decoded RGB image.

    Raises:
        ImageError: the bytes are not a readable image, or it has more pixels than the
            limit (:func:`vlkit.data.decode.max_pixels`).
    """
    return _decode_scaled(data, min_size)[0]


def thumbnail_jpeg(img: Image.Image, size: int, quality: int = 85) -> bytes:
    """A JPEG of ``img`` scaled down (never up) so that its longer side is at most ``size`` pixels.

    The image itself is left as it was.
    """
    small = img.copy()
    small.thumbnail((size, size), Image.Resampling.BICUBIC)
    if small.mode != "RGB":
        small = small.convert("RGB")
    buf = io.BytesIO()
    small.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def mentions_side(text: str) -> bool:
    """Whether a caption says "left" or "right", so a flipped image would contradict it.

    Args:
        text: caption.

    Returns:
        True when ``left`` or ``right`` occurs as a whole word, in any case.
    """
    return _SIDE_WORDS.search(text) is not None


# ------------------------------------------------------------------------- tensors


def to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    """Convert an image to a uint8 tensor, channels first.

    Args:
        img: image in any mode; converted to RGB first.

    Returns:
        uint8 tensor ``[3, H, W]``.
    """
    if img.mode != "RGB":
        img = img.convert("RGB")
    array = np.array(img, dtype=np.uint8)  # [H, W, 3], a writable copy
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()  # [3, H, W]


def normalize(
    batch: torch.Tensor,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> torch.Tensor:
    """Scale uint8 pixels to [0, 1] and standardise each channel.

    Args:
        batch: uint8 tensor ``[B, 3, H, W]`` (or ``[3, H, W]``), on any device.
        mean: per-channel mean, on the [0, 1] scale.
        std: per-channel standard deviation, on the [0, 1] scale.

    Returns:
        float32 tensor of the same shape, ``(batch / 255 - mean) / std``.

    Raises:
        VlkitError: the channel dimension does not match ``mean`` and ``std``.
    """
    channels = len(mean)
    if batch.dim() < 3 or batch.shape[-3] != channels or len(std) != channels:
        raise VlkitError(
            f"normalize expects [B, {channels}, H, W] with {channels} means and stds, "
            f"got shape {tuple(batch.shape)} with {len(mean)} means and {len(std)} stds"
        )
    mean_t = torch.tensor(mean, dtype=torch.float64).view(channels, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float64).view(channels, 1, 1)
    # (x / 255 - mean) / std == x * scale + shift, done in place on one float copy
    scale = (1.0 / (255.0 * std_t)).to(torch.float32).to(batch.device)
    shift = (-mean_t / std_t).to(torch.float32).to(batch.device)
    return batch.to(torch.float32).mul_(scale).add_(shift)  # [B, 3, H, W]


# ----------------------------------------------------------------------- the pipeline


def train_min_size(image_size: int, scale: tuple[float, float], ratio: tuple[float, float]) -> int:
    """Shorter side an image needs so every random crop still has ``image_size`` pixels a side.

    A crop of area fraction s and aspect r on a W x H image (H the shorter side) is at
    least ``H * sqrt(s * min(r, 1 / r))`` pixels on each side, so decoding with this
    shorter side never upsamples a crop that full-size decoding would not.

    Args:
        image_size: output side.
        scale: crop area range.
        ratio: crop aspect range.

    Returns:
        The minimum shorter side to decode at.
    """
    narrowest = min(ratio[0], 1.0 / ratio[1], 1.0)
    return int(math.ceil(image_size / math.sqrt(scale[0] * narrowest)))


@dataclass
class ImageTransform:
    """Encoded image bytes to a uint8 ``[3, S, S]`` tensor, for evaluation or training.

    Evaluation resizes the shorter side to ``image_size`` and crops the centre. Training
    takes a random resized crop and mirrors it with probability 0.5 when ``flip`` is set
    and the caller allows it (pass ``allow_flip=not mentions_side(caption)``). Both do
    a single bicubic resize of a box of the decoded image.

    Attributes:
        image_size: output side S.
        train: training (random) or evaluation (deterministic) transform.
        scale: crop area range for training, as fractions of the image area.
        ratio: crop aspect ratio range for training, width / height.
        flip: mirror training crops at random.
        mean: per-channel mean for :meth:`normalize`.
        std: per-channel standard deviation for :meth:`normalize`.
        draft: decode large JPEGs in draft mode (reduced scale), keeping a shorter side
            of at least ``DRAFT_GAP * image_size`` for evaluation and
            :func:`train_min_size` for training.
    """

    image_size: int = 224
    train: bool = False
    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    draft: bool = True

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise VlkitError(f"image_size must be positive, got {self.image_size}")
        if not 0.0 < self.scale[0] <= self.scale[1] <= 1.0:
            raise VlkitError(f"scale must satisfy 0 < low <= high <= 1, got {self.scale}")
        if not 0.0 < self.ratio[0] <= self.ratio[1]:
            raise VlkitError(f"ratio must satisfy 0 < low <= high, got {self.ratio}")

    def __call__(
        self, data: bytes, rng: random.Random | None = None, allow_flip: bool = True
    ) -> torch.Tensor:
        """Decode and transform one image.

        Args:
            data: encoded image.
            rng: source of randomness, required in training mode; the result is a
                function of its state. Training always draws the same random numbers
                whether or not flipping is allowed.
            allow_flip: False to never mirror this image (e.g. its caption says left
                or right).

        Returns:
            uint8 tensor ``[3, S, S]``.

        Raises:
            ImageError: undecodable bytes, or more pixels than the limit.
            VlkitError: training without an rng.
        """
        if self.train:
            if rng is None:
                raise VlkitError("ImageTransform(train=True) needs an rng (random.Random)")
            img = self._train_image(data, rng, allow_flip)
        else:
            img = self._eval_image(data)
        return to_uint8_tensor(img)  # [3, S, S]

    def with_thumbnail(self, data: bytes, size: int) -> tuple[torch.Tensor, bytes]:
        """The evaluation transform of one image and a JPEG thumbnail of it, from a single decode.

        Args:
            data: encoded image.
            size: the thumbnail's longer side, in pixels.

        Returns:
            uint8 tensor ``[3, S, S]`` and the thumbnail's JPEG bytes.

        Raises:
            ImageError: undecodable bytes, or more pixels than the limit.
            VlkitError: a training transform (its crops are random, a thumbnail would not show the image).
        """
        if self.train:
            raise VlkitError("thumbnails come from the evaluation transform, not a training one")
        min_size = self._min_size()
        img, (width, height), factor = _decode_scaled(data, None if min_size is None else max(min_size, size))
        left, top, right, bottom = eval_crop_box(width, height, self.image_size)
        box = (left / factor, top / factor, right / factor, bottom / factor)
        pixels = to_uint8_tensor(img.resize((self.image_size, self.image_size), BICUBIC, box=box))
        return pixels, thumbnail_jpeg(img, size)

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """Normalise a uint8 ``[B, 3, S, S]`` batch with this transform's mean and std."""
        return normalize(batch, self.mean, self.std)

    def _min_size(self) -> int | None:
        """Shorter side to decode at least, or None to decode full size."""
        if not self.draft:
            return None
        if self.train:
            # Already sized for the smallest possible crop; typical crops are larger.
            return train_min_size(self.image_size, self.scale, self.ratio)
        return int(math.ceil(self.image_size * DRAFT_GAP))

    def _decode_crop(self, data: bytes, box_for: Callable[[int, int], FloatBox]) -> Image.Image:
        """Decode, pick a box on the original size, and resize it to the output square.

        The box is chosen in original pixel coordinates and mapped onto the (possibly
        draft-reduced) decoded image, so the geometry does not depend on draft mode.
        """
        img, (width, height), factor = _decode_scaled(data, self._min_size())
        left, top, right, bottom = box_for(width, height)
        box = (left / factor, top / factor, right / factor, bottom / factor)
        return img.resize((self.image_size, self.image_size), BICUBIC, box=box)

    def _eval_image(self, data: bytes) -> Image.Image:
        return self._decode_crop(data, lambda w, h: eval_crop_box(w, h, self.image_size))

    def _train_image(self, data: bytes, rng: random.Random, allow_flip: bool) -> Image.Image:
        def box_for(width: int, height: int) -> FloatBox:
            left, top, crop_w, crop_h = random_resized_crop_box(
                width, height, rng, self.scale, self.ratio
            )
            return left, top, left + crop_w, top + crop_h

        out = self._decode_crop(data, box_for)
        do_flip = rng.random() < 0.5
        if self.flip and allow_flip and do_flip:
            out = hflip(out)
        return out
