"""BEiT-style masked image modelling: a Vision Transformer whose masked patches are replaced by a learned mask
token predicts, at every masked position, the token id a VQ-VAE tokenizer (:mod:`vlkit.models.vqvae`) gives
that patch; cross-entropy on the masked positions only.

The encoder is a plain :class:`~vlkit.modules.encoders.vit.VisionTransformer` (``encoder.*`` in the state dict),
so after pretraining it can start the image tower of another model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlkit.models.preprocess import Preprocess
from vlkit.modules.encoders.vit import VisionConfig, VisionTransformer
from vlkit.modules.layers.pos_embed import resample_grid


def _default_preprocess() -> Preprocess:
    return Preprocess(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), context_length=1, tokenizer=None)


@dataclass
class BEiTConfig:
    """Sizes of a :class:`BEiT`.

    Attributes:
        vision: the ViT encoder's sizes (its ``image_size`` and ``patch_size`` fix the patch grid, which must equal
            the tokenizer's token grid).
        vocab_size: token ids predicted (the tokenizer's ``num_codes``).
        mask_ratio: share of the patches masked in each image (training and validation).
        preprocess: image size and normalisation.
    """

    vision: VisionConfig = field(default_factory=lambda: VisionConfig(image_size=32, patch_size=8, width=64,
                                                                      layers=2, heads=2, act="gelu"))
    vocab_size: int = 64
    mask_ratio: float = 0.4
    preprocess: Preprocess = field(default_factory=_default_preprocess)


class BEiT(nn.Module):
    """A ViT with a mask token and a linear head over the tokenizer's vocabulary; see the module docstring.

    Args:
        config: sizes.

    Example:
        >>> model = BEiT(BEiTConfig())
        >>> mask = torch.zeros(2, 16, dtype=torch.bool); mask[:, :6] = True
        >>> model(torch.randn(2, 3, 32, 32), mask).shape     # [batch, patches, vocab]
        torch.Size([2, 16, 64])
    """

    architecture = "beit"
    config_class = BEiTConfig
    LR_GROUPS = {"image": ("encoder.", "mask_token")}
    #: no text tower: training needs no tokenizer and no captions
    has_text = False

    def __init__(self, config: BEiTConfig):
        super().__init__()
        if not 0.0 < config.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be between 0 and 1, got {config.mask_ratio}")
        self.config = config
        self.encoder = VisionTransformer(config.vision)
        width = config.vision.width
        self.mask_token = nn.Parameter(torch.zeros(width))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.head = nn.Linear(width, config.vocab_size)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    @property
    def preprocess(self) -> Preprocess:
        return self.config.preprocess

    def num_patches(self, image_size: int | None = None) -> int:
        """Patches of a square image of ``image_size`` pixels (default: the preprocessing size)."""
        side = (image_size or self.preprocess.image_size) // self.config.vision.patch_size
        return side * side

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.set_grad_checkpointing(enable)

    def forward_features(self, images: Tensor, mask: Tensor | None = None) -> Tensor:
        """Token features ``[batch, 1 + patches, width]`` with the patches where ``mask`` ``[batch, patches]`` is
        true (or 1) replaced by the mask token before the positions are added."""
        vit = self.encoder
        x = vit.patch_embed(images)  # [batch, patches, width]
        if mask is not None:
            if mask.shape != x.shape[:2]:
                raise ValueError(f"mask {tuple(mask.shape)} does not fit {x.shape[1]} patches per image")
            x = torch.where(mask.bool()[..., None], self.mask_token.to(x.dtype), x)
        grid = vit.patch_embed.grid(images.shape[-2], images.shape[-1])
        pos = resample_grid(vit.pos_embed, vit.grid, grid)
        cls = vit.class_embedding.to(x.dtype)[None, None].expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + pos.to(x.dtype)  # [batch, 1 + patches, width]
        return vit.transformer(vit.ln_pre(x))

    def forward(self, images: Tensor, mask: Tensor) -> Tensor:
        """Token-id logits ``[batch, patches, vocab_size]`` of every patch (the loss reads the masked ones)."""
        tokens = self.forward_features(images, mask)[:, 1:]  # [batch, patches, width]
        return self.head(self.encoder.ln_post(tokens))

    def encode_image(self, images: Tensor, normalize: bool = True) -> Tensor:
        """The encoder's pooled feature ``[batch, width]`` of unmasked images (for probes and fine-tuning)."""
        x = self.encoder(images)
        return F.normalize(x, dim=-1) if normalize else x


def masked_token_loss(logits: Tensor, targets: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Cross-entropy and accuracy over the masked positions only.

    Args:
        logits: ``[batch, patches, vocab]``.
        targets: ``[batch, patches]`` the tokenizer's ids.
        mask: ``[batch, patches]``, true (or 1) where a patch is masked.

    Returns:
        ``(loss, accuracy)``: the mean cross-entropy and the share of masked tokens predicted right (detached).
    """
    chosen = mask.bool()
    picked = logits[chosen].float()  # [masked, vocab]
    wanted = targets[chosen]
    loss = F.cross_entropy(picked, wanted)
    return loss, (picked.argmax(-1) == wanted).float().mean().detach()
