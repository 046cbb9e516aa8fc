"""Imagination: an image optimised until a frozen image tower embeds it close to a text.

The image is parameterised in a decorrelated Fourier basis (Olah et al., "Feature Visualization", 2017): its
pixels are the inverse real FFT of learned complex coefficients, each frequency scaled by ``1 / frequency`` so
that the optimiser moves low frequencies first, and its colours come from three decorrelated channels mixed by a
fixed colour-correlation matrix, squashed into the pixel range by a sigmoid. At every step a batch of randomly
jittered, scaled, rotated and cropped copies of the image is embedded, and the mean cosine similarity with the
text's embedding is raised, so that what survives is a picture of the text rather than adversarial noise.
``neuron`` adds one channel of the last feature map to the objective (BriVL's neuron constraint).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlkit.errors import VlkitError
from vlkit.explain.towers import gradients_through, tap_feature_map

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
        copies: augmented copies embedded at each step.
        jitter: largest shift in pixels, as a fraction of the side.
        scale: range of random zoom factors.
        rotate: largest rotation in degrees, either way.
        neuron: a channel of the image tower's last feature map whose mean activation is also raised.
        neuron_weight: weight of that channel's mean activation against the cosine similarity.
        seed: seed of the initial coefficients and of the augmentations.
    """

    steps: int = 256
    size: int | None = None
    lr: float = 0.05
    copies: int = 8
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
            raise VlkitError(f"copies must be at least 1, got {self.copies}")
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

    def forward(self) -> Tensor:
        spectrum = torch.view_as_complex(self.coeffs) * self.scale  # [3, size, size // 2 + 1]
        decorrelated = torch.fft.irfftn(spectrum, s=(self.size, self.size), norm="ortho")  # [3, size, size]
        colour = COLOR_CORRELATION / COLOR_CORRELATION.norm(dim=0).max()
        mixed = torch.einsum("ij,jhw->ihw", colour, decorrelated)
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
        text_embedding: ``[dim]`` the text's embedding (normalised or not).
        settings: the optimisation.
        image_size: the side the model takes its images at.
        normalize: maps pixels in [0, 1] ``[batch, 3, S, S]`` to what the model takes (its mean and std).
        progress: called after every step with the step number and the similarity.

    Returns:
        The image ``[3, size, size]`` in [0, 1].

    Raises:
        VlkitError: a setting out of range, or ``neuron`` past the last channel of the feature map.
    """
    settings.check()
    size = settings.size or image_size
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    image = FourierImage(size, generator).to(device)
    optimiser = torch.optim.Adam(image.parameters(), lr=settings.lr)
    target = F.normalize(text_embedding.detach().float().to(device), dim=-1)
    frozen = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        for step in range(settings.steps):
            optimiser.zero_grad(set_to_none=True)
            with torch.enable_grad(), gradients_through(model), tap_feature_map(model, (image_size, image_size)) \
                    as fmap:
                views = augment(image(), settings.copies, image_size, settings, rng)
                embedded = model.encode_image(normalize(views))  # [copies, dim]
                similarity = F.cosine_similarity(embedded, target[None], dim=-1).mean()
                loss = -similarity
                if settings.neuron is not None:
                    loss = loss - settings.neuron_weight * _channel(fmap.spatial(), settings.neuron)
                loss.backward()
            optimiser.step()
            if progress is not None:
                progress(step + 1, float(similarity.detach()))
    finally:
        for p, flag in zip(model.parameters(), frozen):
            p.requires_grad_(flag)
    with torch.no_grad():
        return image()[0].cpu()


def _channel(spatial: Tensor, channel: int) -> Tensor:
    """The mean activation of one channel of a feature map ``[batch, channels, h, w]``."""
    if channel >= spatial.shape[1]:
        raise VlkitError(f"--neuron {channel} is past the last channel of the feature map "
                         f"({spatial.shape[1]} channels, 0 to {spatial.shape[1] - 1})")
    return spatial[:, channel].mean()


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
