"""A VQ-VAE image tokenizer: a small convolutional encoder, a :class:`~vlkit.modules.layers.codebook.Codebook`
and a convolutional decoder. An image becomes a grid of code ids (``encode``) and back (``decode``); the ids are
the targets of BEiT-style masked image modelling (:mod:`vlkit.models.beit`).

The encoder halves the image side ``downsample`` times (strided 4x4 convolutions), so a ``S``-pixel image gives
``S / 2**downsample`` tokens a side; the decoder mirrors it with transposed convolutions. Training minimises the
reconstruction error plus ``commitment`` times the commitment loss (and the codebook loss without EMA), see
:func:`vqvae_loss`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlkit.models.preprocess import Preprocess
from vlkit.modules.layers.codebook import Codebook


def _default_preprocess() -> Preprocess:
    return Preprocess(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), context_length=1, tokenizer=None)


@dataclass
class VQVAEConfig:
    """Sizes of a :class:`VQVAE` and the preprocessing it expects.

    Attributes:
        channels: width of the convolutions.
        downsample: stride-2 stages of the encoder (tokens a side = image side / 2**downsample).
        res_blocks: residual blocks after the encoder's strided convolutions (and before the decoder's).
        code_dim: length of a code.
        num_codes: codes in the codebook (the token vocabulary).
        ema: codes updated by moving averages (else by the codebook loss).
        decay: EMA decay of the codebook.
        eps: Laplace smoothing of the codebook's counts.
        restart_after: training steps a code may go unused before it restarts (0: never).
        commitment: weight of the commitment loss (beta of VQ-VAE).
        preprocess: image size and normalisation (the reconstruction target is the normalised image).
    """

    channels: int = 64
    downsample: int = 3
    res_blocks: int = 1
    code_dim: int = 32
    num_codes: int = 128
    ema: bool = True
    decay: float = 0.99
    eps: float = 1e-5
    restart_after: int = 50
    commitment: float = 0.25
    preprocess: Preprocess = field(default_factory=_default_preprocess)


@dataclass
class VQVAEOutput:
    """What :meth:`VQVAE.forward` returns.

    Attributes:
        reconstruction: ``[batch, 3, H, W]`` decoded images (normalised scale).
        ids: ``[batch, h, w]`` token ids.
        commitment_loss, codebook_loss: the codebook's losses (scalars).
        usage, perplexity: code usage and perplexity of the batch (detached scalars).
        restarted: dead codes restarted at this step.
    """

    reconstruction: Tensor
    ids: Tensor
    commitment_loss: Tensor
    codebook_loss: Tensor
    usage: Tensor
    perplexity: Tensor
    restarted: Tensor


class ResBlock(nn.Module):
    """``x + conv1x1(relu(conv3x3(relu(x))))``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


def _encoder(c: VQVAEConfig) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(c.downsample):
        layers += [nn.Conv2d(3 if i == 0 else c.channels, c.channels, 4, stride=2, padding=1), nn.ReLU()]
    layers += [ResBlock(c.channels) for _ in range(c.res_blocks)]
    layers += [nn.ReLU(), nn.Conv2d(c.channels, c.code_dim, 1)]
    return nn.Sequential(*layers)


def _decoder(c: VQVAEConfig) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(c.code_dim, c.channels, 3, padding=1)]
    layers += [ResBlock(c.channels) for _ in range(c.res_blocks)]
    layers.append(nn.ReLU())
    for i in range(c.downsample):
        last = i == c.downsample - 1
        layers.append(nn.ConvTranspose2d(c.channels, 3 if last else c.channels, 4, stride=2, padding=1))
        if not last:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class VQVAE(nn.Module):
    """Images to a grid of code ids and back; see the module docstring.

    Args:
        config: sizes and preprocessing.

    Example:
        >>> model = VQVAE(VQVAEConfig(channels=16, downsample=2, num_codes=32, code_dim=8))
        >>> ids = model.encode(torch.randn(2, 3, 32, 32))   # [2, 8, 8]
        >>> model.decode(ids).shape
        torch.Size([2, 3, 32, 32])
    """

    architecture = "vqvae"
    config_class = VQVAEConfig
    #: every parameter trains at the image tower's rate (optim.lr_image)
    LR_GROUPS = {"image": ("encoder.", "decoder.", "codebook.")}
    #: no text tower: training needs no tokenizer and no captions
    has_text = False

    def __init__(self, config: VQVAEConfig):
        super().__init__()
        if config.downsample < 1:
            raise ValueError(f"downsample must be at least 1, got {config.downsample}")
        if config.preprocess.image_size % 2**config.downsample:
            raise ValueError(f"image_size {config.preprocess.image_size} must divide by 2**downsample "
                             f"({2**config.downsample})")
        self.config = config
        self.encoder = _encoder(config)
        self.codebook = Codebook(config.num_codes, config.code_dim, ema=config.ema, decay=config.decay,
                                 eps=config.eps, restart_after=config.restart_after)
        self.decoder = _decoder(config)

    @property
    def preprocess(self) -> Preprocess:
        return self.config.preprocess

    @property
    def num_codes(self) -> int:
        return self.config.num_codes

    def token_grid(self, image_size: int | None = None) -> tuple[int, int]:
        """Tokens ``(h, w)`` of a square image of ``image_size`` pixels (default: the preprocessing size)."""
        side = (image_size or self.preprocess.image_size) // 2**self.config.downsample
        return side, side

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Nothing to checkpoint in so small a network (accepted for the trainer's switch)."""

    def _quantize(self, images: Tensor):
        z = self.encoder(images)  # [batch, code_dim, h, w]
        return self.codebook(z.permute(0, 2, 3, 1))  # vectors last: [batch, h, w, code_dim]

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Token ids ``[batch, h, w]`` (int64) of preprocessed images ``[batch, 3, H, W]``; the codebook is
        not updated."""
        was = self.codebook.training
        self.codebook.eval()
        try:
            return self._quantize(images).ids
        finally:
            self.codebook.train(was)

    def decode(self, ids: Tensor) -> Tensor:
        """Images ``[batch, 3, H, W]`` (normalised scale) from token ids ``[batch, h, w]``."""
        codes = self.codebook.lookup(ids).permute(0, 3, 1, 2)  # [batch, code_dim, h, w]
        return self.decoder(codes)

    def forward(self, images: Tensor) -> VQVAEOutput:
        """Encode, quantise (in training mode the codebook updates) and decode ``[batch, 3, H, W]`` images."""
        q = self._quantize(images)
        recon = self.decoder(q.quantized.permute(0, 3, 1, 2))  # [batch, 3, H, W]
        return VQVAEOutput(recon, q.ids, q.commitment_loss, q.codebook_loss, q.usage, q.perplexity, q.restarted)


def vqvae_loss(out: VQVAEOutput, images: Tensor, commitment: float) -> tuple[Tensor, Tensor]:
    """The training loss of a VQ-VAE and its reconstruction part.

    Args:
        out: the model's output for ``images``.
        images: ``[batch, 3, H, W]`` the normalised input images (the target).
        commitment: weight of the commitment loss.

    Returns:
        ``(loss, mse)``: ``mse + commitment * commitment_loss + codebook_loss`` and the mean squared
        reconstruction error, both scalars.
    """
    mse = F.mse_loss(out.reconstruction.float(), images.float())
    return mse + commitment * out.commitment_loss.float() + out.codebook_loss.float(), mse
