"""Imagination: the imagined image matches its own prompt among the captions of other images, shows the
prompt's colour and is classified as the prompt's shape by the same model; the Fourier parameterisation and the
``vlkit imagine`` command."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a red circle", "a blue square", "a yellow triangle"]


@pytest.fixture(scope="module")
def loaded(explain_run):
    from vlkit.inference.loading import load_for_inference

    return load_for_inference(explain_run)


@pytest.fixture(scope="module")
def imagined(loaded):
    """Each prompt's imagined image ``[3, 32, 32]`` (128 steps)."""
    from vlkit.explain.imagine import ImagineSettings, embed_texts, imagine, pixel_normalizer

    model = loaded.model
    transform = model.preprocess.image_transform(train=False)
    normalize = pixel_normalizer(transform.mean, transform.std)
    targets = embed_texts(model, loaded.tokenizer, PROMPTS)
    return {p: imagine(model, t, ImagineSettings(steps=128, seed=1), image_size=transform.image_size,
                       normalize=normalize) for p, t in zip(PROMPTS, targets)}


def embed(loaded, image: torch.Tensor) -> torch.Tensor:
    """The image's embedding without any augmentation."""
    from vlkit.explain.imagine import pixel_normalizer

    transform = loaded.model.preprocess.image_transform(train=False)
    with torch.no_grad():
        return F.normalize(loaded.model.encode_image(pixel_normalizer(transform.mean, transform.std)(image[None])),
                           dim=-1)[0]


def other_captions(synth, prompt: str, n: int = 60) -> list[str]:
    """The first captions of ``n`` training images that do not show the prompt's object."""
    name = prompt.split(" ", 1)[1]
    lines = [json.loads(line) for line in (synth.parent / "synth.jsonl").read_text().splitlines()]
    return [rec["text"][0] for rec in lines if not any(name in t for t in rec["text"])][:n]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_imagined_image_ranks_its_prompt_first(loaded, imagined, synth, prompt):
    """Embedded again without augmentations, the image is closer to its prompt than to 60 captions of images
    that do not show that object."""
    from vlkit.explain.imagine import embed_texts

    others = other_captions(synth, prompt)
    assert len(others) >= 50
    sims = embed_texts(loaded.model, loaded.tokenizer, [prompt, *others]) @ embed(loaded, imagined[prompt])
    assert int(sims.argmax()) == 0, f"{prompt!r} ranks {int((sims > sims[0]).sum()) + 1}"


def dominant_colour(image: torch.Tensor) -> str:
    """The palette colour nearest to most of the image's saturated pixels (grey and beige left out)."""
    from vlkit.data.synth import COLORS

    pixels = image.permute(1, 2, 0).reshape(-1, 3) * 255
    saturated = pixels[(pixels.max(1).values - pixels.min(1).values) > 80]
    palette = torch.tensor(list(COLORS.values()), dtype=torch.float32)
    votes = torch.cdist(saturated, palette).argmin(1).bincount(minlength=len(COLORS))
    return list(COLORS)[int(votes.argmax())]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_imagined_image_has_the_colour_and_the_shape(loaded, imagined, prompt):
    """"a red circle" gives a mostly red image that the model classifies as a red circle by zero-shot over
    the 18 colour-shape classes; likewise for the other prompts."""
    from vlkit.data.synth import CLASSES
    from vlkit.explain.imagine import embed_texts

    image = imagined[prompt]
    assert dominant_colour(image) == prompt.split()[1]
    classes = embed_texts(loaded.model, loaded.tokenizer, [f"a {c}" for c in CLASSES])
    assert CLASSES[int((classes @ embed(loaded, image)).argmax())] == prompt.split(" ", 1)[1]


def test_an_untrained_start_is_grey_noise_and_low_frequencies_are_favoured():
    """The Fourier image starts near mid-grey, and a unit step on every coefficient moves the lowest frequency
    most (its 1/f scale), as the decorrelated parameterisation intends."""
    from vlkit.explain.imagine import FourierImage

    image = FourierImage(16, torch.Generator().manual_seed(0))
    with torch.no_grad():
        start = image()
    assert start.shape == (1, 3, 16, 16) and abs(float(start.mean()) - 0.5) < 0.02
    assert float(image.scale[0, 0]) == 16.0 and float(image.scale[8, 8]) == pytest.approx(1 / (0.5 * 2 ** 0.5))


def test_augment_keeps_an_unmoved_image_when_every_transformation_is_off():
    """With no jitter, no scale and no rotation an augmented copy is the image itself (closed form)."""
    import random

    from vlkit.explain.imagine import ImagineSettings, augment

    image = torch.rand(1, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    still = ImagineSettings(jitter=0.0, scale=(1.0, 1.0), rotate=0.0)
    torch.testing.assert_close(augment(image, 2, 12, still, random.Random(0)), image.expand(2, -1, -1, -1),
                               atol=1e-5, rtol=0)
    moved = augment(image, 2, 12, ImagineSettings(), random.Random(0))
    assert not torch.allclose(moved[0], image[0], atol=1e-3)


def test_neuron_constraint_raises_its_channel(loaded):
    """--neuron C raises channel C of the last feature map above what the text alone gives."""
    from vlkit.explain.imagine import ImagineSettings, embed_texts, imagine, pixel_normalizer
    from vlkit.explain.towers import tap_feature_map

    model = loaded.model
    transform = model.preprocess.image_transform(train=False)
    normalize = pixel_normalizer(transform.mean, transform.std)
    target = embed_texts(model, loaded.tokenizer, ["a red circle"])[0]

    def channel_mean(neuron: int | None) -> float:
        image = imagine(model, target, ImagineSettings(steps=40, neuron=neuron, neuron_weight=1.0), image_size=32,
                        normalize=normalize)
        with torch.no_grad(), tap_feature_map(model, (32, 32)) as fmap:
            model.encode_image(normalize(image[None]))
            return float(fmap.spatial()[0, 5].mean())

    assert channel_mean(5) > channel_mean(None) + 0.5
    with pytest.raises(Exception, match="past the last channel"):
        imagine(model, target, ImagineSettings(steps=1, neuron=10_000), image_size=32, normalize=normalize)


def test_imagine_command_writes_a_grid(explain_run, tmp_path):
    from PIL import Image

    out = tmp_path / "imagined.png"
    result = run_cli("imagine", explain_run, "a red circle", "a blue square", "--steps", "5", "--out", out,
                     "--no-progress")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].endswith("a red circle") and lines[1].endswith("a blue square")
    with Image.open(out) as written:
        assert written.size == (2 * 160, 160 + 16) and "vlkit-figure" in written.text
    theirs = tmp_path / "theirs.png"
    Image.new("RGB", (4, 4)).save(theirs)
    before = theirs.read_bytes()
    refused = run_cli("imagine", explain_run, "a red circle", "--steps", "1", "--out", theirs, "--no-progress")
    assert refused.returncode == 2 and "not a figure vlkit wrote" in refused.stderr
    assert theirs.read_bytes() == before
    bad = run_cli("imagine", explain_run, "a red circle", "--steps", "0", "--out", tmp_path / "x.png")
    assert bad.returncode == 2 and "--steps must be at least 1" in bad.stderr
    vit = run_cli("imagine", explain_run, "a red circle", "--work-size", "16", "--precision", "fp32", "--out",
                  tmp_path / "y.png", "--no-progress")
    assert vit.returncode == 2 and "--work-size 16: the image tower takes 32 px only" in vit.stderr
    assert not (tmp_path / "y.png").exists()
    threads = run_cli("imagine", explain_run, "a red circle", "--threads", "0", "--out", tmp_path / "z.png")
    assert threads.returncode == 2 and "--threads must be at least 1, got 0" in threads.stderr


class _ConvTwoTower(torch.nn.Module):
    """A tiny CNN two-tower stand-in (convolutions followed by batch norms, like EfficientNet) for the fast path."""

    LR_GROUPS = {"image": ("tower.",)}

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        bn = [torch.nn.BatchNorm2d(8), torch.nn.BatchNorm2d(16)]
        for norm in bn:  # eval-mode statistics far from the identity, so that a wrong fold would show
            norm.running_mean.uniform_(-0.5, 0.5)
            norm.running_var.uniform_(0.5, 2.0)
            torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
            torch.nn.init.uniform_(norm.bias, -0.2, 0.2)
        self.tower = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), bn[0], torch.nn.ReLU(),
                                         torch.nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), bn[1],
                                         torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(),
                                         torch.nn.Linear(64, 12))
        self.eval()

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.tower(images), dim=-1)


def _imagine_conv(model, progress=None, **options) -> torch.Tensor:
    from vlkit.explain.imagine import ImagineSettings, imagine, pixel_normalizer

    target = F.normalize(torch.linspace(-1, 1, 12), dim=0)
    return imagine(model, target, ImagineSettings(steps=4, seed=3, **options), image_size=24,
                   normalize=pixel_normalizer((0.5,) * 3, (0.25,) * 3), progress=progress)


def test_fast_path_follows_the_plain_path_and_leaves_the_model_as_it_was():
    """Channels-last convolutions with the batch norms folded (seen during the steps) give, in fp32, the image of
    the plain path (no folding, NCHW: the reference) after 4 steps; the model's parameters, modules and flags are
    put back."""
    model = _ConvTwoTower()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    bn = model.tower[1]
    during = set()

    def watch(step: int, similarity: float) -> None:
        nhwc = model.tower[0].weight.is_contiguous(memory_format=torch.channels_last)
        during.add((type(model.tower[1]).__name__, type(model.tower[4]).__name__, nhwc))

    plain = _imagine_conv(model, watch, precision="fp32", fast=False)
    assert during == {("BatchNorm2d", "BatchNorm2d", False)}
    during.clear()
    fast = _imagine_conv(model, watch, precision="fp32", fast=True)
    assert during == {("Identity", "Identity", True)}
    torch.testing.assert_close(fast, plain, atol=2e-4, rtol=0)
    assert not torch.allclose(plain, _imagine_conv(model, precision="fp32", fast=True, copies=1), atol=1e-3)
    assert list(model.parameters()) == params and model.tower[1] is bn
    assert all(p.requires_grad for p in model.parameters())
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], atol=0, rtol=0)
        assert value.is_contiguous()


def test_precision_and_work_size_reach_the_tower():
    """bf16 makes the convolutions compute in bf16 (fp32 does not), and the copies enter the tower in one batch
    at --work-size pixels; a ViT tower refuses --work-size with one line."""
    from vlkit.errors import VlkitError

    model = _ConvTwoTower()
    seen = []
    hook = model.tower[0].register_forward_hook(lambda m, args, out: seen.append((out.dtype, tuple(args[0].shape))))
    try:
        _imagine_conv(model, precision="bf16", copies=3, work_size=16)
        assert seen[-1] == (torch.bfloat16, (3, 3, 16, 16))
        _imagine_conv(model, precision="fp32", copies=2)
        assert seen[-1] == (torch.float32, (2, 3, 24, 24))
    finally:
        hook.remove()
    with pytest.raises(VlkitError, match="--precision must be one of"):
        _imagine_conv(model, precision="fp16")


def test_work_size_is_refused_for_a_vit_tower(loaded):
    from vlkit.errors import VlkitError
    from vlkit.explain.imagine import ImagineSettings, embed_texts, imagine, pixel_normalizer

    target = embed_texts(loaded.model, loaded.tokenizer, ["a red circle"])[0]
    with pytest.raises(VlkitError, match="--work-size 16: the image tower takes 32 px only"):
        imagine(loaded.model, target, ImagineSettings(steps=1, work_size=16), image_size=32,
                normalize=pixel_normalizer((0.5,) * 3, (0.5,) * 3))


@pytest.mark.parametrize("cores, load, expected", [(2, 0.2, 2), (2, 0.6, 1), (2, 1.2, 1), (2, 7.5, 1), (8, 2.6, 5),
                                                   (8, 0.0, 8)])
def test_idle_cores_leaves_the_busy_cores_to_other_jobs(monkeypatch, cores, load, expected):
    """The thread count is the cores minus the rounded 1-minute load average, at least 1 (closed form)."""
    import os

    from vlkit.explain import imagine

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, 0.0, 0.0))
    assert imagine.idle_cores() == expected
