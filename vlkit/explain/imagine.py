"""Imagination: an image optimised until a frozen image tower embeds it close to a text.

The image is parameterised in a decorrelated Fourier basis (Olah et al., "Feature Visualization", 2017): its
pixels are the inverse real FFT of learned complex coefficients, each frequency scaled by ``1 / frequency`` so
that the optimiser moves low frequencies first, and its colours come from three decorrelated channels mixed by a
fixed colour-correlation matrix, squashed into the pixel range by a sigmoid. At every step a batch of randomly
jittered, scaled, rotated and cropped copies of the image is embedded, and the mean cosine similarity with the
text's embedding is raised, so that what survives is a picture of the text rather than adversarial noise.
``neuron`` adds one channel of the last feature map to the objective (BriVL's neuron constraint).

Speed: nearly all of a step is the image tower's forward and backward pass over the copies (the Fourier image
and the affine resampling take about 1 %; measured with ``torch.profiler`` on the quickstart model at 224 px).
So the copies go through the tower as one batch, under bf16 autocast where the CPU or GPU computes bf16
natively, with channels-last convolutions and the batch norms folded into the convolutions before them
(:mod:`vlkit.inference.speed`; the model is restored afterwards), and the default is 4 copies and 128 steps.
The thread count matters most on a shared machine: :func:`idle_cores` leaves the cores other jobs keep busy.
``bench/imagine.py`` measures it with the quickstart model (BriVL, EfficientNet-Lite0) at 224 px on a 2-core
x86_64 CPU (AVX512-BF16) shared with one other busy job: before (8 copies, fp32, NCHW, 2 threads) 0.9 to 6.8 s a
step, 256 steps; now 0.17 s a step on 1 thread, 128 steps in 22 s (10.9x the whole image at the fastest "before"
step), and each of 3 prompts still ranks first among 51 captions when its image is embedded again.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlkit.errors import VlkitError
from vlkit.explain.towers import gradients_through, image_tower, tap_feature_map
from vlkit.inference.speed import PRECISIONS, autocast, prepared, resolve_precision, to_channels_last

#: Square root of a colour-correlation matrix of natural images (the one feature-visualisation work uses), so
#: that the three learned channels are uncorrelated.
COLOR_CORRELATION = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])


@dataclass
class ImagineSettings:
    """How an image is imagined.

    Attributes:
        steps: optimisation steps.
        size: side of the imagined image in pixels (``None``: the model's input size).
        lr: Adam learning rate of the Fourier coefficients.
        copies: augmented copies embedded at each step, as one batch.
        work_size: side the augmented copies are resampled to and embedded at (``None``: the model's input
            size); smaller is faster, for towers that take any input size (CNNs).
        precision: ``auto`` (bf16 autocast where the hardware computes bf16 natively, else fp32), ``fp32`` or
            ``bf16``.
        fast: channels-last convolutions and batch norms folded into them while the image is optimised.
        jitter: largest shift in pixels, as a fraction of the side.
        scale: range of random zoom factors.
        rotate: largest rotation in degrees, either way.
        neuron: a channel of the image tower's last feature map whose mean activation is also raised.
        neuron_weight: weight of that channel's mean activation against the cosine similarity.
        seed: seed of the initial coefficients and of the augmentations.
    """

    steps: int = 128
    size: int | None = None
    lr: float = 0.05
    copies: int = 4
    work_size: int | None = None
    precision: str = "auto"
    fast: bool = True
    jitter: float = 0.06
    scale: tuple[float, float] = (0.9, 1.1)
    rotate: float = 10.0
    neuron: int | None = None
    neuron_weight: float = 0.1
    seed: int = 0

    def check(self) -> None:
        """Raise :class:`~vlkit.errors.VlkitError` naming the first setting out of range."""
        if self.steps < 1:
            raise VlkitError(f"--steps must be at least 1, got {self.steps}")
        if self.size is not None and not 8 <= self.size <= 1024:
            raise VlkitError(f"--size must be from 8 to 1024 pixels, got {self.size}")
        if self.copies < 1:
            raise VlkitError(f"--copies must be at least 1, got {self.copies}")
        if self.work_size is not None and not 8 <= self.work_size <= 1024:
            raise VlkitError(f"--work-size must be from 8 to 1024 pixels, got {self.work_size}")
        if self.precision not in PRECISIONS:
            raise VlkitError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.neuron is not None and self.neuron < 0:
            raise VlkitError(f"--neuron must be a channel number, 0 or more, got {self.neuron}")
        if not 0 < self.scale[0] <= self.scale[1]:
            raise VlkitError(f"scale must satisfy 0 < low <= high, got {self.scale}")


class FourierImage(nn.Module):
    """An RGB image ``[1, 3, size, size]`` in [0, 1] from decorrelated, frequency-scaled Fourier coefficients.

    Args:
        size: the image side.
        generator: source of the small random initial coefficients.
    """

    def __init__(self, size: int, generator: torch.Generator | None = None):
        super().__init__()
        self.size = size
        fy = torch.fft.fftfreq(size)[:, None]
        fx = torch.fft.rfftfreq(size)[None, :]
        freq = torch.sqrt(fx * fx + fy * fy)  # [size, size // 2 + 1]
        self.register_buffer("scale", 1.0 / torch.clamp(freq, min=1.0 / size))
        shape = (3, size, size // 2 + 1, 2)
        self.coeffs = nn.Parameter(torch.randn(shape, generator=generator) * 0.01)
        colour = COLOR_CORRELATION / COLOR_CORRELATION.norm(dim=0).max()
        self.register_buffer("colour", colour, persistent=False)

    def forward(self) -> Tensor:
        spectrum = torch.view_as_complex(self.coeffs) * self.scale  # [3, size, size // 2 + 1]
        decorrelated = torch.fft.irfftn(spectrum, s=(self.size, self.size), norm="ortho")  # [3, size, size]
        mixed = torch.einsum("ij,jhw->ihw", self.colour, decorrelated)
        return torch.sigmoid(mixed)[None]  # [1, 3, size, size]


def augment(image: Tensor, copies: int, out_size: int, settings: ImagineSettings, rng: random.Random) -> Tensor:
    """Randomly jittered, scaled and rotated copies of ``image`` ``[1, 3, S, S]``, cropped to ``out_size``.

    Returns:
        ``[copies, 3, out_size, out_size]``.
    """
    thetas = []
    for _ in range(copies):
        angle = math.radians(rng.uniform(-settings.rotate, settings.rotate))
        zoom = 1.0 / rng.uniform(*settings.scale)
        tx, ty = (rng.uniform(-settings.jitter, settings.jitter) * 2 for _ in range(2))
        cos, sin = math.cos(angle) * zoom, math.sin(angle) * zoom
        thetas.append([[cos, -sin, tx], [sin, cos, ty]])
    theta = torch.tensor(thetas, dtype=image.dtype, device=image.device)  # [copies, 2, 3]
    grid = F.affine_grid(theta, [copies, 3, out_size, out_size], align_corners=False)
    return F.grid_sample(image.expand(copies, -1, -1, -1), grid, mode="bilinear", padding_mode="reflection",
                         align_corners=False)


def imagine(model: nn.Module, text_embedding: Tensor, settings: ImagineSettings, *, image_size: int,
            normalize: Callable[[Tensor], Tensor], progress: Callable[[int, float], None] | None = None) -> Tensor:
    """Optimise an image whose embedding by ``model`` matches ``text_embedding``.

    Args:
        model: a two-tower model (its weights are left untouched).
        text_embedding: ``[dim]`` the text's embedding (normalised or not), computed once by the caller.
        settings: the optimisation.
        image_size: the side the model takes its images at.
        normalize: maps pixels in [0, 1] ``[batch, 3, S, S]`` to what the model takes (its mean and std).
        progress: called after every step with the step number and the similarity.

    Returns:
        The image ``[3, size, size]`` in [0, 1].

    Raises:
        VlkitError: a setting out of range, ``work_size`` with a ViT tower, or ``neuron`` past the last channel
            of the feature map.

    Example:
        >>> image = imagine(model, embed_texts(model, tokenizer, ["a red circle"])[0], ImagineSettings(steps=64),
        ...                 image_size=224, normalize=pixel_normalizer((0.5,) * 3, (0.5,) * 3))
    """
    settings.check()
    size = settings.size or image_size
    work = settings.work_size or image_size
    if work != image_size and hasattr(image_tower(model), "patch_embed"):
        raise VlkitError(f"--work-size {work}: the image tower takes {image_size} px only (a ViT); leave it out")
    device = next(model.parameters()).device
    precision = resolve_precision(settings.precision, device)
    generator = torch.Generator().manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    image = FourierImage(size, generator).to(device)
    optimiser = torch.optim.Adam(image.parameters(), lr=settings.lr)
    target = F.normalize(text_embedding.detach().float().to(device), dim=-1)

    def example() -> Tensor:  # checks the folded batch norms
        return model.encode_image(normalize(torch.full((1, 3, work, work), 0.5, device=device)))

    frozen = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with prepared(model, channels_last=settings.fast, fold=settings.fast, example=example) as nhwc:
            for step in range(settings.steps):
                optimiser.zero_grad(set_to_none=True)
                with torch.enable_grad(), gradients_through(model), _feature_map(model, settings, work) as fmap:
                    views = normalize(augment(image(), settings.copies, work, settings, rng))  # [copies, 3, w, w]
                    with autocast(precision, device):
                        embedded = model.encode_image(to_channels_last(views) if nhwc else views)
                    similarity = F.cosine_similarity(embedded.float(), target[None], dim=-1).mean()
                    loss = -similarity
                    if settings.neuron is not None:
                        loss = loss - settings.neuron_weight * _channel(fmap.spatial().float(), settings.neuron)
                    loss.backward()
                optimiser.step()
                if progress is not None:
                    progress(step + 1, float(similarity.detach()))
    finally:
        for p, flag in zip(model.parameters(), frozen):
            p.requires_grad_(flag)
    with torch.no_grad():
        return image()[0].cpu()


def _feature_map(model: nn.Module, settings: ImagineSettings, work: int):
    """The tap on the last feature map when ``neuron`` is set (else nothing is hooked)."""
    if settings.neuron is None:
        return contextlib.nullcontext()
    return tap_feature_map(model, (work, work))


def _channel(spatial: Tensor, channel: int) -> Tensor:
    """The mean activation of one channel of a feature map ``[batch, channels, h, w]``."""
    if channel >= spatial.shape[1]:
        raise VlkitError(f"--neuron {channel} is past the last channel of the feature map "
                         f"({spatial.shape[1]} channels, 0 to {spatial.shape[1] - 1})")
    return spatial[:, channel].mean()


def idle_cores() -> int:
    """The CPU cores that the 1-minute load average leaves idle (at least 1): the thread count for imagining.

    Imagination is hundreds of small passes through a CNN; an OpenMP thread that shares its core with another
    job stalls the others at every barrier. Measured on a 2-core machine while one other job ran
    (``bench/imagine.py``): 2 threads took 0.3 to 3.8 s a step, 1 thread a steady 0.16 s.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average on this system
        return cores
    return max(1, min(cores, cores - math.floor(load + 0.5)))


def pixel_normalizer(mean, std) -> Callable[[Tensor], Tensor]:
    """A differentiable map from pixels in [0, 1] ``[batch, 3, S, S]`` to ``(x - mean) / std``."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def normalize(pixels: Tensor) -> Tensor:
        return (pixels - mean_t.to(pixels.device)) / std_t.to(pixels.device)

    return normalize


def embed_texts(model: nn.Module, tokenizer, texts: list[str]) -> Tensor:
    """The normalised embeddings ``[len(texts), dim]`` of some texts."""
    device = next(model.parameters()).device
    tokens = tokenizer([t.strip() for t in texts])
    with torch.no_grad():
        return F.normalize(model.encode_text(tokens["input_ids"].to(device),
                                             tokens["attention_mask"].to(device)).float(), dim=-1)
