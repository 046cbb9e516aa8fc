"""Crop boxes, resizing and flipping of Pillow images, as the image transforms use them.

Boxes are chosen in original pixel coordinates, so a caller that decodes at a reduced scale (JPEG draft
mode) can map them onto the smaller image and get the same geometry.
"""

from __future__ import annotations

import math
import random

from PIL import Image

BICUBIC = Image.Resampling.BICUBIC

#: Box as (left, top, width, height) in pixels.
Box = tuple[int, int, int, int]
#: Box as (left, top, right, bottom), possibly fractional, as Pillow's resize takes it.
FloatBox = tuple[float, float, float, float]


def resize_shorter(img: Image.Image, size: int, resample: int = BICUBIC) -> Image.Image:
    """Resize so the shorter side is ``size``, keeping the aspect ratio.

    The longer side is truncated to an integer, as torchvision's ``Resize`` does, so
    results match the usual CLIP preprocessing.

    Args:
        img: input image.
        size: target length of the shorter side.
        resample: Pillow resampling filter.

    Returns:
        The resized image (the input itself when it already has that size).
    """
    if min(img.size) == size:
        return img
    return img.resize(_shorter_side_size(img.width, img.height, size), resample)


def _shorter_side_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after resizing the shorter side to ``size``; the longer side truncated."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """Crop the central ``size`` x ``size`` square.

    Offsets are ``int(round((W - size) / 2.0))`` (and likewise for H), the usual
    convention. Parts of the box outside a smaller image are filled with black.

    Args:
        img: input image.
        size: side of the square crop.

    Returns:
        The cropped image.
    """
    left, top = _center_offsets(img.width, img.height, size)
    return img.crop((left, top, left + size, top + size))


def _center_offsets(width: int, height: int, size: int) -> tuple[int, int]:
    """(left, top) of the central ``size`` square, rounded the usual way."""
    return int(round((width - size) / 2.0)), int(round((height - size) / 2.0))


def eval_crop_box(width: int, height: int, size: int) -> FloatBox:
    """The region of an image that :func:`resize_shorter` then :func:`center_crop` keep.

    Resizing this box of the original image straight to ``size`` x ``size`` samples the
    same points with the same filter width as resizing the whole image and cropping, at
    a fraction of the cost.

    Args:
        width: original image width.
        height: original image height.
        size: output side.

    Returns:
        (left, top, right, bottom) in original pixel coordinates, possibly fractional.
    """
    resized_w, resized_h = _shorter_side_size(width, height, size)
    left, top = _center_offsets(resized_w, resized_h, size)
    scale_x, scale_y = width / resized_w, height / resized_h
    return left * scale_x, top * scale_y, (left + size) * scale_x, (top + size) * scale_y


def random_resized_crop_box(
    width: int,
    height: int,
    rng: random.Random,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Box:
    """Sample a crop box covering a random area fraction with a random aspect ratio.

    Up to 10 attempts draw an area fraction uniformly from ``scale`` and an aspect ratio
    (width / height) log-uniformly from ``ratio``; the first box that fits is placed
    uniformly at random. If none fits, the box is the whole image clamped to the ratio
    range, centred.

    Args:
        width: image width in pixels.
        height: image height in pixels.
        rng: source of randomness; the box is a function of its state.
        scale: range of the box area as a fraction of the image area.
        ratio: range of the box aspect ratio, width / height.

    Returns:
        The box as (left, top, width, height).
    """
    area = width * height
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_low, log_high))
        crop_w = int(round(math.sqrt(target_area * aspect)))
        crop_h = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            left = rng.randint(0, width - crop_w)
            top = rng.randint(0, height - crop_h)
            return left, top, crop_w, crop_h
    return _fallback_box(width, height, ratio)


def _fallback_box(width: int, height: int, ratio: tuple[float, float]) -> Box:
    """Centred box of the whole image, narrowed to the closest aspect ratio in range."""
    image_ratio = width / height
    crop_w, crop_h = width, height
    if image_ratio < min(ratio):
        crop_h = int(round(width / min(ratio)))
    elif image_ratio > max(ratio):
        crop_w = int(round(height * max(ratio)))
    return (width - crop_w) // 2, (height - crop_h) // 2, crop_w, crop_h


def random_resized_crop(
    img: Image.Image,
    size: int,
    rng: random.Random,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    resample: int = BICUBIC,
) -> Image.Image:
    """Crop a random box (see :func:`random_resized_crop_box`) and resize it to a square.

    Args:
        img: input image.
        size: side of the output square.
        rng: source of randomness.
        scale: range of the box area as a fraction of the image area.
        ratio: range of the box aspect ratio, width / height.
        resample: Pillow resampling filter.

    Returns:
        The ``size`` x ``size`` crop.
    """
    left, top, crop_w, crop_h = random_resized_crop_box(img.width, img.height, rng, scale, ratio)
    return img.resize((size, size), resample, box=(left, top, left + crop_w, top + crop_h))


def hflip(img: Image.Image) -> Image.Image:
    """Mirror the image left to right."""
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
