"""Masked autoencoder (He et al. 2022): a ViT encoder over the visible patches only, a light decoder that fills in
mask tokens, and a pixel loss on the masked patches."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlkit.models.mae.loss import mae_loss, patchify
from vlkit.models.preprocess import Preprocess
from vlkit.modules.encoders.vit import VisionConfig, VisionTransformer
from vlkit.modules.layers.masking import PatchMask, gather_patches, random_patch_mask
from vlkit.modules.layers.pos_embed import resample_grid, sinusoidal_2d
from vlkit.modules.layers.transformer import Transformer, TransformerEncoderLayer

MAE_MEAN = (0.485, 0.456, 0.406)
MAE_STD = (0.229, 0.224, 0.225)


def _default_preprocess() -> Preprocess:
    return Preprocess(image_size=224, mean=MAE_MEAN, std=MAE_STD)


@dataclass
class MAEConfig:
    """Sizes and switches of a :class:`MAE`.

    Attributes:
        image_size, patch_size: input and patch sides.
        width, layers, heads, mlp_ratio: the ViT encoder (the tower a CLIP/ALBEF image tower is initialised from).
        pool: the pooled feature of :meth:`MAE.encode_image`: ``mean`` of the patch tokens or the ``cls`` token.
        decoder_width, decoder_layers, decoder_heads: the light decoder.
        mask_ratio: share of patches masked in training.
        norm_pix_loss: reconstruct per-patch normalised pixels.
        preprocess: image size and normalisation.
    """

    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    pool: str = "mean"
    decoder_width: int = 512
    decoder_layers: int = 8
    decoder_heads: int = 16
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    preprocess: Preprocess = field(default_factory=_default_preprocess)

    @property
    def embed_dim(self) -> int:
        """Width of :meth:`MAE.encode_image` features."""
        return self.width

    def vision(self) -> VisionConfig:
        """The encoder's :class:`VisionConfig`."""
        return VisionConfig(image_size=self.image_size, patch_size=self.patch_size, width=self.width,
                            layers=self.layers, heads=self.heads, mlp_ratio=self.mlp_ratio, act="gelu",
                            norm_eps=1e-6, pool=self.pool)


@dataclass
class MAEOutput:
    """What :meth:`MAE.forward` returns.

    Attributes:
        loss: the masked-patch reconstruction loss.
        pred: predicted pixels of every patch ``[batch, patches, p*p*3]`` (normalised if ``norm_pix_loss``).
        mask: ``[batch, patches]``, 1 where a patch was masked.
    """

    loss: Tensor
    pred: Tensor
    mask: Tensor


class MAE(nn.Module):
    """Masked autoencoder with a :class:`~vlkit.modules.encoders.vit.VisionTransformer` encoder (``encoder.*``
    keys, the same as a CLIP ``visual.*`` tower).

    Args:
        config: the sizes.

    Example:
        >>> model = vlkit.create_model("mae-vit-tiny")
        >>> model(images).loss                  # masked-patch pixel loss
        >>> model.encode_image(images).shape    # [batch, width], L2-normalised, the full image
    """

    architecture = "mae"
    config_class = MAEConfig
    LR_GROUPS = {"image": ("encoder.",)}
    #: the pre-training loss this model computes itself (counted by the trainer's FLOPs as ``head="pretrain"``)
    pretrain_losses = ("mae",)

    def __init__(self, config: MAEConfig):
        super().__init__()
        if config.image_size % config.patch_size:
            raise ValueError(f"image_size {config.image_size} is not a multiple of patch_size {config.patch_size}")
        self.config = config
        self.encoder = VisionTransformer(config.vision())
        grid = config.image_size // config.patch_size
        self.grid = (grid, grid)
        dw = config.decoder_width
        self.decoder_embed = nn.Linear(config.width, dw)
        self.mask_token = nn.Parameter(torch.zeros(dw))
        self.decoder_pos = nn.Parameter(torch.zeros(1 + grid * grid, dw))
        self.decoder = Transformer([TransformerEncoderLayer(dw, config.decoder_heads, 4.0, "gelu", 1e-6)
                                    for _ in range(config.decoder_layers)])
        self.decoder_norm = nn.LayerNorm(dw, eps=1e-6)
        self.decoder_pred = nn.Linear(dw, config.patch_size**2 * 3)
        self._init_weights()

    def _init_weights(self) -> None:
        with torch.no_grad():  # fixed 2-D sine-cosine positions to start from (learned afterwards)
            if self.config.width % 4 == 0:
                self.encoder.pos_embed.zero_()
                self.encoder.pos_embed[1:] = sinusoidal_2d(*self.grid, self.config.width)
            if self.config.decoder_width % 4 == 0:
                self.decoder_pos[1:] = sinusoidal_2d(*self.grid, self.config.decoder_width)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in [*self.encoder.transformer.modules(), *self.decoder.modules(), self.decoder_embed,
                       self.decoder_pred]:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    @property
    def preprocess(self) -> Preprocess:
        return self.config.preprocess

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.set_grad_checkpointing(enable)
        self.decoder.grad_checkpointing = enable

    def random_mask(self, batch: int, device: torch.device, generator: torch.Generator | None = None) -> PatchMask:
        """A new :class:`PatchMask` per image at the model's ``mask_ratio``."""
        return random_patch_mask(batch, self.grid[0] * self.grid[1], self.config.mask_ratio, generator, device)

    # ------------------------------------------------------------------ encoder
    def forward_encoder(self, images: Tensor, mask: PatchMask) -> Tensor:
        """Encoder tokens ``[batch, 1 + visible, width]`` (class token first), normalised: only the visible
        patches enter the blocks."""
        enc = self.encoder
        x = enc.patch_embed(images)  # [batch, patches, width]
        pos = resample_grid(enc.pos_embed, enc.grid, enc.patch_embed.grid(images.shape[-2], images.shape[-1]))
        x = gather_patches(x + pos[1:].to(x.dtype), mask.keep)  # [batch, visible, width]
        cls = (enc.class_embedding + pos[0]).to(x.dtype)[None, None].expand(x.shape[0], 1, -1)
        x = enc.ln_pre(torch.cat([cls, x], dim=1))
        return enc.ln_post(enc.transformer(x))  # [batch, 1 + visible, width]

    # ------------------------------------------------------------------ decoder
    def forward_decoder(self, tokens: Tensor, mask: PatchMask) -> Tensor:
        """Predicted pixels ``[batch, patches, p*p*3]`` of every patch, from the encoder tokens of the visible ones
        and a shared mask token in place of each masked one."""
        x = self.decoder_embed(tokens)  # [batch, 1 + visible, dw]
        b, n = mask.mask.shape
        fill = self.mask_token.to(x.dtype)[None, None].expand(b, n - mask.num_keep, -1)
        patches = gather_patches(torch.cat([x[:, 1:], fill], dim=1), mask.restore)  # [batch, patches, dw]
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos.to(x.dtype)
        x = self.decoder_norm(self.decoder(x))
        return self.decoder_pred(x[:, 1:])  # [batch, patches, p*p*3]

    def forward(self, images: Tensor, *_text: Tensor | None, head: str | None = None, mask: PatchMask | None = None,
                generator: torch.Generator | None = None, **_unused) -> MAEOutput:
        """Mask, encode, decode and score one batch of images ``[batch, 3, H, W]``.

        Args:
            images: normalised images at the model's ``image_size``.
            head: ignored (``pretrain`` is the only forward); text arguments are ignored too, so the trainer's
                FLOPs counter can call every model alike.
            mask: the patches to mask (default: a new random mask per image).
            generator: random source of the default mask.
        """
        if mask is None:
            mask = self.random_mask(images.shape[0], images.device, generator)
        pred = self.forward_decoder(self.forward_encoder(images, mask), mask)
        target = patchify(images, self.config.patch_size)
        return MAEOutput(mae_loss(pred, target, mask.mask, self.config.norm_pix_loss), pred, mask.mask)

    # ------------------------------------------------------------------ features
    def forward_features(self, images: Tensor) -> Tensor:
        """Encoder tokens of the whole, unmasked image ``[batch, 1 + patches, width]`` (before ``ln_post``)."""
        return self.encoder.forward_features(images)

    def encode_image(self, images: Tensor, normalize: bool = True) -> Tensor:
        """Pooled encoder feature of the whole, unmasked image ``[batch, width]`` (``config.pool``: mean of
        the patch tokens or the class token), L2-normalised unless ``normalize`` is False."""
        x = self.encoder.pool(self.encoder.forward_features(images))
        return F.normalize(x, dim=-1) if normalize else x
