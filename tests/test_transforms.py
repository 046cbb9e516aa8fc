"""Image transforms against independent references (numpy slicing, loops, full decoding)."""

from __future__ import annotations

import io
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlkit.data.decode import set_max_pixels
from vlkit.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    DRAFT_GAP,
    ImageError,
    ImageTransform,
    center_crop,
    decode,
    eval_crop_box,
    hflip,
    mentions_side,
    normalize,
    random_resized_crop,
    random_resized_crop_box,
    resize_shorter,
    to_uint8_tensor,
    train_min_size,
)
from vlkit.errors import VlkitError

FLICKR_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k-1k" / "images"


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """An RGB image of random pixels, so any misplaced pixel shows."""
    array = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(array)


def gradient_jpeg(width: int = 800, height: int = 600, quality: int = 95) -> bytes:
    """A smooth, asymmetric colour gradient encoded as JPEG."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    red = xs / (width - 1) * 255
    green = ys / (height - 1) * 255
    blue = 128 + 100 * np.sin(xs / 90.0) * np.cos(ys / 70.0)
    array = np.stack([red, green, blue], axis=-1).clip(0, 255).astype(np.uint8)
    return encode(Image.fromarray(array), "JPEG", quality=quality)


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


@pytest.fixture(scope="module")
def jpeg_800x600() -> bytes:
    return gradient_jpeg()


# ------------------------------------------------------------------------ decoding


def test_decode_png_and_grayscale_give_rgb() -> None:
    img = noise_image(13, 7)
    decoded = decode(encode(img, "PNG"))
    assert decoded.mode == "RGB" and decoded.size == (13, 7)
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(img))
    gray = decode(encode(img.convert("L"), "PNG"))
    assert gray.mode == "RGB"
    assert (np.asarray(gray)[..., 0] == np.asarray(img.convert("L"))).all()


@pytest.mark.parametrize("data", [b"", b"not an image at all", b"\xff\xd8\xff\xe0" + b"\0" * 20])
def test_decode_garbage_raises(data: bytes) -> None:
    with pytest.raises(VlkitError, match="cannot decode"):
        decode(data)
    with pytest.raises(VlkitError):
        ImageTransform(32)(data)


def test_decode_truncated_jpeg_raises(jpeg_800x600: bytes) -> None:
    with pytest.raises(VlkitError):
        decode(jpeg_800x600[: len(jpeg_800x600) // 2])


def test_draft_decode_keeps_min_size(jpeg_800x600: bytes) -> None:
    assert decode(jpeg_800x600).size == (800, 600)
    # 600 // 224 = 2: half scale keeps the shorter side at 300 >= 224.
    assert decode(jpeg_800x600, min_size=224).size == (400, 300)
    # 600 // 64 = 9: draft mode goes at most to 1/8, 75 >= 64.
    assert decode(jpeg_800x600, min_size=64).size == (100, 75)
    # No reduction possible: full size.
    assert decode(jpeg_800x600, min_size=400).size == (800, 600)
    for min_size in (1, 50, 75, 76, 150, 151, 299, 300, 301):
        assert min(decode(jpeg_800x600, min_size=min_size).size) >= min_size
    # Not a JPEG: min_size is ignored.
    png = encode(noise_image(80, 60), "PNG")
    assert decode(png, min_size=8).size == (80, 60)


@pytest.mark.parametrize("train", [False, True])
def test_decode_is_bounded_by_the_pixel_limit_in_one_header_parse(jpeg_800x600: bytes, train: bool,
                                                                 monkeypatch) -> None:
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(1) or real_open(*a, **k))
    transform = ImageTransform(32, train=train)  # draft mode would decode only 100x75 pixels
    try:
        set_max_pixels(800 * 600 - 1)  # the limit applies to the size the header declares
        with pytest.raises(ImageError, match="image of 800x600 = 0.5 Mpx is over the pixel limit") as info:
            transform(jpeg_800x600, random.Random(0))
        assert info.value.reason.startswith("image of 800x600") and isinstance(info.value, VlkitError)
        with pytest.raises(ImageError, match="over the pixel limit"):
            decode(jpeg_800x600, min_size=64)
        set_max_pixels(800 * 600)
        opened.clear()
        assert transform(jpeg_800x600, random.Random(0)).shape == (3, 32, 32)
        assert len(opened) == 1  # the header is parsed once: the check rides on the decode's own open
    finally:
        set_max_pixels(None)


# ----------------------------------------------------------- geometric transforms


@pytest.mark.parametrize(
    "width,height,size", [(37, 23, 16), (40, 40, 17), (23, 37, 10), (30, 31, 30)]
)
def test_center_crop_equals_numpy_slicing(width: int, height: int, size: int) -> None:
    img = noise_image(width, height)
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    expected = np.asarray(img)[top : top + size, left : left + size]
    np.testing.assert_array_equal(np.asarray(center_crop(img, size)), expected)


@pytest.mark.parametrize(
    "width,height", [(800, 600), (600, 800), (333, 500), (224, 224), (100, 50)]
)
def test_resize_shorter_size_and_aspect(width: int, height: int) -> None:
    out = resize_shorter(noise_image(width, height), 224)
    assert min(out.size) == 224
    assert abs(out.width / out.height - width / height) < 1.0 / 224 * max(1, width / height)
    # The longer side is the exact value truncated, never rounded up.
    long_exact = 224 * max(width, height) / min(width, height)
    assert max(out.size) == math.floor(long_exact)


def test_eval_box_matches_resize_then_crop() -> None:
    img = noise_image(331, 251, seed=3)
    reference = np.asarray(center_crop(resize_shorter(img, 64), 64), dtype=np.float64)
    box = eval_crop_box(img.width, img.height, 64)
    single = np.asarray(img.resize((64, 64), Image.Resampling.BICUBIC, box=box), dtype=np.float64)
    assert np.abs(single - reference).mean() < 0.5


def test_random_resized_crop_box_bounds() -> None:
    rng = random.Random(0)
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    for width, height in ((500, 375), (375, 500), (640, 640), (97, 211)):
        for _ in range(500):
            left, top, w, h = random_resized_crop_box(width, height, rng, scale, ratio)
            assert 0 <= left and 0 <= top and w > 0 and h > 0
            assert left + w <= width and top + h <= height
            # w and h are rounded to integers: allow half a pixel on each.
            area_tol = (w + h) / (width * height)
            assert scale[0] - area_tol <= w * h / (width * height) <= scale[1] + area_tol
            ratio_tol = 0.5 / h + 0.5 * w / h**2
            assert ratio[0] - ratio_tol <= w / h <= ratio[1] + ratio_tol


def test_random_resized_crop_box_deterministic_per_seed() -> None:
    def draws(seed: int) -> list[tuple[int, int, int, int]]:
        rng = random.Random(seed)
        return [random_resized_crop_box(500, 375, rng) for _ in range(20)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_random_resized_crop_box_fallback_is_clamped_centre() -> None:
    # No box of aspect 3/4..4/3 with area >= 50 % fits a 1000 x 10 strip: fallback.
    box = random_resized_crop_box(1000, 10, random.Random(0), scale=(0.5, 1.0))
    assert box == ((1000 - 13) // 2, 0, 13, 10)
    box = random_resized_crop_box(10, 1000, random.Random(0), scale=(0.5, 1.0))
    assert box == (0, (1000 - 13) // 2, 10, 13)


def test_random_resized_crop_equals_crop_then_resize() -> None:
    img = noise_image(120, 90, seed=1)
    out = random_resized_crop(img, 32, random.Random(5), scale=(0.3, 1.0))
    left, top, w, h = random_resized_crop_box(120, 90, random.Random(5), scale=(0.3, 1.0))
    reference = img.crop((left, top, left + w, top + h)).resize((32, 32), Image.Resampling.BICUBIC)
    assert out.size == (32, 32)
    diff = np.abs(np.asarray(out, dtype=np.float64) - np.asarray(reference, dtype=np.float64))
    assert diff.mean() < 3.0  # the box resize may read a little beyond the edges


def test_hflip_mirrors_columns() -> None:
    img = noise_image(9, 4)
    np.testing.assert_array_equal(np.asarray(hflip(img)), np.asarray(img)[:, ::-1])


@pytest.mark.parametrize(
    "text,expected",
    [
        ("A dog on the left of a cat", True),
        ("RIGHT hand raised", True),
        ("turning left-handed", True),
        ("left", True),
        ("A man, right.", True),
        ("leftover pizza", False),
        ("a bright day", False),
        ("copyright notice", False),
        ("the rights of man", False),
        ("", False),
    ],
)
def test_mentions_side(text: str, expected: bool) -> None:
    assert mentions_side(text) is expected


# --------------------------------------------------------------------------- tensors


def test_to_uint8_tensor_layout() -> None:
    img = noise_image(5, 3)
    tensor = to_uint8_tensor(img)
    assert tensor.dtype == torch.uint8 and tensor.shape == (3, 3, 5)
    array = np.asarray(img)
    for c in range(3):
        np.testing.assert_array_equal(tensor[c].numpy(), array[..., c])
    assert to_uint8_tensor(img.convert("L")).shape == (3, 3, 5)


def test_normalize_equals_per_pixel_loop() -> None:
    batch = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.uint8)
    out = normalize(batch, CLIP_MEAN, CLIP_STD)
    assert out.dtype == torch.float32 and out.shape == batch.shape
    for b in range(2):
        for c in range(3):
            for y in range(4):
                for x in range(5):
                    expected = (int(batch[b, c, y, x]) / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c]
                    assert abs(float(out[b, c, y, x]) - expected) < 1e-5
    assert torch.equal(ImageTransform().normalize(batch), out)


def test_normalize_rejects_wrong_channels() -> None:
    with pytest.raises(VlkitError, match="normalize"):
        normalize(torch.zeros(2, 4, 3, 3, dtype=torch.uint8))


# ------------------------------------------------------------------------ pipeline


def mean_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().mean().item()


def test_eval_transform_matches_resize_and_crop(jpeg_800x600: bytes) -> None:
    out = ImageTransform(224, draft=False)(jpeg_800x600)
    assert out.dtype == torch.uint8 and out.shape == (3, 224, 224)
    reference = to_uint8_tensor(center_crop(resize_shorter(decode(jpeg_800x600), 224), 224))
    assert mean_abs_diff(out, reference) < 0.5


@pytest.mark.parametrize("size", [96, 64])
def test_eval_draft_close_to_full_decode(jpeg_800x600: bytes, size: int) -> None:
    # Evaluation drafts to a shorter side of at least DRAFT_GAP * size: 1/2 or 1/4 here.
    assert min(decode(jpeg_800x600, int(DRAFT_GAP * size)).size) < 600
    drafted = ImageTransform(size, draft=True)(jpeg_800x600)
    full = ImageTransform(size, draft=False)(jpeg_800x600)
    assert drafted.shape == full.shape == (3, size, size)
    assert mean_abs_diff(drafted, full) < 1.5


def test_train_draft_close_to_full_decode(jpeg_800x600: bytes) -> None:
    # Image size 64 with scale >= 0.5 needs a shorter side of 105: decoded at 1/4.
    assert train_min_size(64, (0.5, 1.0), (3 / 4, 4 / 3)) == 105
    assert min(decode(jpeg_800x600, 105).size) < 600
    drafted = ImageTransform(64, train=True, draft=True)
    full = ImageTransform(64, train=True, draft=False)
    for seed in range(5):
        a = drafted(jpeg_800x600, random.Random(seed))
        b = full(jpeg_800x600, random.Random(seed))
        assert a.shape == b.shape == (3, 64, 64)
        assert mean_abs_diff(a, b) < 1.5


@pytest.mark.skipif(not FLICKR_IMAGES.is_dir(), reason="flickr8k-1k sample images not present")
def test_draft_on_real_photos() -> None:
    files = sorted(FLICKR_IMAGES.glob("*.jpg"))[:6]
    for file in files:
        data = file.read_bytes()
        for train in (False, True):
            a = ImageTransform(64, train=train, draft=True)(data, random.Random(1))
            b = ImageTransform(64, train=train, draft=False)(data, random.Random(1))
            assert a.shape == b.shape == (3, 64, 64)
            # DRAFT_GAP 1.25 trades up to ~3/255 mean difference at 64 px for decoding at 1/4 scale
            assert mean_abs_diff(a, b) < 4.0


def test_train_transform_deterministic_per_rng(jpeg_800x600: bytes) -> None:
    transform = ImageTransform(48, train=True)
    a = transform(jpeg_800x600, random.Random(11))
    b = transform(jpeg_800x600, random.Random(11))
    c = transform(jpeg_800x600, random.Random(12))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_train_requires_rng(jpeg_800x600: bytes) -> None:
    with pytest.raises(VlkitError, match="rng"):
        ImageTransform(32, train=True)(jpeg_800x600)


def test_flip_happens_and_is_skipped_when_caption_mentions_side(jpeg_800x600: bytes) -> None:
    transform = ImageTransform(32, train=True)
    flipped = 0
    for seed in range(20):
        allowed = transform(jpeg_800x600, random.Random(seed), allow_flip=True)
        allow = not mentions_side("a dog on the left")
        never = transform(jpeg_800x600, random.Random(seed), allow_flip=allow)
        if torch.equal(allowed, never):
            continue
        assert torch.equal(allowed, never.flip(-1))
        flipped += 1
    assert 3 <= flipped <= 17
    no_flip = ImageTransform(32, train=True, flip=False)
    for seed in range(20):
        assert torch.equal(
            no_flip(jpeg_800x600, random.Random(seed)),
            transform(jpeg_800x600, random.Random(seed), allow_flip=False),
        )


def test_invalid_settings_raise() -> None:
    with pytest.raises(VlkitError):
        ImageTransform(0)
    with pytest.raises(VlkitError):
        ImageTransform(32, scale=(0.9, 0.5))
    with pytest.raises(VlkitError):
        ImageTransform(32, ratio=(2.0, 1.0))
