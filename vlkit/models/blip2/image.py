"""BLIP-2's frozen image encoder: image tokens from a ViT or from EfficientNet-Lite0's last feature map, whose
parameters never train, followed by a trainable LayerNorm (BLIP-2's ``ln_vision``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vlkit.errors import VlkitError
from vlkit.modules.encoders.efficientnet import efficientnet_lite0
from vlkit.modules.encoders.vit import VisionConfig, VisionTransformer
from vlkit.modules.layers.pos_embed import resample_grid

CNN_STRIDE = 32  # EfficientNet's last feature map is 1/32 of the image side
IMAGE_ENCODERS = ("vit", "efficientnet_lite0")


class FrozenImageEncoder(nn.Module):
    """Images ``[batch, 3, H, W]`` -> tokens ``[batch, N, width]`` for the Q-Former's cross-attention.

    The encoder (``visual``) runs without gradients and stays in eval mode (a CNN's batch-norm statistics never
    move). A ViT gives its ``1 + patches`` tokens before its final LayerNorm; EfficientNet-Lite0 the cells of
    its last feature map row by row (7x7 at 224 px), with a learned position per cell (a CNN's cells carry no
    position of their own). A trainable LayerNorm follows.

    Args:
        kind: ``vit`` or ``efficientnet_lite0``.
        image_size: input side in pixels.
        patch_size, width, layers, heads: the ViT.
        pretrained: load EfficientNet-Lite0's ImageNet weights.
    """

    def __init__(self, kind: str, image_size: int, patch_size: int = 16, width: int = 768, layers: int = 12,
                 heads: int = 12, pretrained: bool = True):
        super().__init__()
        if kind not in IMAGE_ENCODERS:
            raise VlkitError(f"unknown BLIP-2 image_encoder {kind!r}; available: {', '.join(IMAGE_ENCODERS)}")
        self.kind = kind
        self.pos = None
        if kind == "vit":
            self.visual = VisionTransformer(VisionConfig(image_size, patch_size, width, layers, heads, act="gelu",
                                                         norm_eps=1e-6))
            self.width, self.grid = width, None
        else:
            self.visual = efficientnet_lite0(pretrained=pretrained, num_classes=0)
            self.width = self.visual.num_features
            side = image_size // CNN_STRIDE
            self.grid = (side, side)
            self.pos = nn.Parameter(torch.randn(side * side, self.width) * 0.02)
        self.visual.requires_grad_(False)
        self.visual.eval()
        self.norm = nn.LayerNorm(self.width, eps=1e-6)

    def train(self, mode: bool = True) -> "FrozenImageEncoder":
        """The frozen encoder stays in eval mode; the LayerNorm (and positions) follow ``mode``."""
        super().train(mode)
        self.visual.eval()
        return self

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        """The frozen encoder's tokens ``[batch, N, width]`` (no gradient)."""
        if self.kind == "vit":
            return self.visual.forward_features(images)  # [batch, 1 + patches, width]
        fmap = self.visual.forward_features(images)  # [batch, 1280, H/32, W/32]
        return fmap.flatten(2).transpose(1, 2)  # [batch, cells, 1280]

    def forward(self, images: Tensor) -> Tensor:
        """``[batch, 3, H, W]`` -> normalised tokens ``[batch, N, width]``."""
        x = self.features(images)
        if self.pos is not None:
            pos = self.pos
            side = (images.shape[-2] // CNN_STRIDE, images.shape[-1] // CNN_STRIDE)
            if side != self.grid and side[0] * side[1] == x.shape[1]:
                pos = resample_grid(pos, self.grid, side, num_prefix=0)
            x = x + pos.to(x.dtype)
        return self.norm(x)
