"""Image to patch tokens."""

from __future__ import annotations

from torch import Tensor, nn


class PatchEmbed(nn.Module):
    """A strided convolution that cuts an image into ``patch_size`` squares and embeds each.

    Args:
        patch_size: side of a patch in pixels.
        dim: embedding width.
        in_channels: image channels.
        bias: a bias on the projection (CLIP has none).
    """

    def __init__(self, patch_size: int, dim: int, in_channels: int = 3, bias: bool = False):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, images: Tensor) -> Tensor:
        """``[batch, C, H, W]`` -> ``[batch, (H/p)*(W/p), dim]``."""
        x = self.proj(images)  # [batch, dim, H/p, W/p]
        return x.flatten(2).transpose(1, 2)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        return height // self.patch_size, width // self.patch_size
