"""Swin Transformer (Liu et al. 2021): a four-stage pyramid of (shifted) window-attention blocks.

Patch embedding (4x4 patches) -> stage 1 -> [patch merging -> stage] x 3 -> LayerNorm. Each stage halves the
map's sides and doubles its width; within a stage, blocks alternate plain and shifted windows. Any input size
works: images are padded to a multiple of the patch size, maps to a multiple of the window (masked).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vlkit.modules.layers.patch_embed import PatchEmbed
from vlkit.modules.layers.patch_merging import PatchMerging
from vlkit.modules.layers.window_attention import SwinBlock


@dataclass
class SwinConfig:
    """Sizes of a :class:`SwinTransformer` (defaults: Swin-T at 224 px).

    Attributes:
        image_size: training input side; a stage whose map is no larger than the window at this size gets a
            window of the map's side (and no shift), as in the published models.
        patch_size: side of a patch in pixels.
        embed_dim: width of stage 1 (stage i has ``embed_dim * 2**i``).
        depths: blocks per stage.
        heads: attention heads per stage.
        window_size: window side in tokens.
        mlp_ratio: MLP hidden width / width.
        act: MLP activation.
        norm_eps: LayerNorm epsilon.
        drop_path: stochastic-depth rate, rising linearly from 0 over the blocks to this value.
        qkv_bias: biases on the query/key/value projections.
    """

    image_size: int = 224
    patch_size: int = 4
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0
    act: str = "gelu"
    norm_eps: float = 1e-5
    drop_path: float = 0.0
    qkv_bias: bool = True


#: Named sizes: ``swin-tiny`` is the published Swin-T; ``swin-micro`` a CPU size for tests and small data.
SWIN_SIZES: dict[str, dict[str, Any]] = {
    "swin-tiny": dict(image_size=224, patch_size=4, embed_dim=96, depths=(2, 2, 6, 2), heads=(3, 6, 12, 24),
                      window_size=7, drop_path=0.2),
    "swin-micro": dict(image_size=64, patch_size=4, embed_dim=32, depths=(2, 2, 2, 2), heads=(1, 2, 4, 8),
                       window_size=4),
}


def swin_config(name: str, **overrides: Any) -> SwinConfig:
    """The :class:`SwinConfig` of a named size (see :data:`SWIN_SIZES`), with fields replaced by ``overrides``.

    Raises:
        ValueError: an unknown name.
    """
    if name not in SWIN_SIZES:
        raise ValueError(f"unknown Swin size {name!r}; available: {sorted(SWIN_SIZES)}")
    return SwinConfig(**{**SWIN_SIZES[name], **overrides})


class SwinStage(nn.Module):
    """Optional patch merging, then blocks with alternately plain and shifted windows.

    Args:
        dim: width of the stage's blocks.
        depth: number of blocks.
        heads: attention heads.
        window: window side.
        in_dim: width of the previous stage (merged down to ``dim``); None for the first stage.
        drop_path: stochastic-depth rate per block.
        config: the remaining sizes.
    """

    def __init__(self, dim: int, depth: int, heads: int, window: int, in_dim: int | None,
                 drop_path: list[float], config: SwinConfig):
        super().__init__()
        self.downsample = PatchMerging(in_dim, dim, config.norm_eps) if in_dim is not None else nn.Identity()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, heads, window, shift=(window // 2 if i % 2 else 0), mlp_ratio=config.mlp_ratio,
                      act=config.act, norm_eps=config.norm_eps, drop_path=drop_path[i], qkv_bias=config.qkv_bias)
            for i in range(depth))
        self.grad_checkpointing = False

    def forward(self, x: Tensor) -> Tensor:
        """``[batch, H, W, in_dim]`` -> ``[batch, H/2, W/2, dim]`` (first stage: sides kept)."""
        x = self.downsample(x)
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.grad_checkpointing and self.training else block(x)
        return x


class SwinTransformer(nn.Module):
    """Images ``[batch, 3, H, W]`` to a pooled feature ``[batch, width]`` or to the four stage maps.

    Args:
        config: the sizes.
    """

    def __init__(self, config: SwinConfig):
        super().__init__()
        if len(config.depths) != len(config.heads) or not config.depths:
            raise ValueError(f"depths {config.depths} and heads {config.heads} must have one entry per stage")
        self.config = config
        c = config
        self.patch_embed = PatchEmbed(c.patch_size, c.embed_dim, bias=True)
        self.patch_norm = nn.LayerNorm(c.embed_dim, eps=c.norm_eps)
        rates = torch.linspace(0, c.drop_path, sum(c.depths)).tolist()
        side = -(-c.image_size // c.patch_size)
        stages, start = [], 0
        for i, (depth, heads) in enumerate(zip(c.depths, c.heads)):
            if i:
                side = -(-side // 2)
            dim = c.embed_dim * 2**i
            stages.append(SwinStage(dim, depth, heads, min(c.window_size, side), dim // 2 if i else None,
                                    rates[start : start + depth], c))
            start += depth
        self.stages = nn.ModuleList(stages)
        self.norm = nn.LayerNorm(self.width, eps=c.norm_eps)
        self.apply(_init_weights)

    @property
    def width(self) -> int:
        """Width of the last stage (the pooled feature)."""
        return self.config.embed_dim * 2 ** (len(self.config.depths) - 1)

    @property
    def num_features(self) -> int:
        """Channels of the last stage map (as CNN backbones name it)."""
        return self.width

    @property
    def stage_widths(self) -> list[int]:
        return [self.config.embed_dim * 2**i for i in range(len(self.config.depths))]

    @property
    def blocks(self) -> nn.ModuleList:
        """All Swin blocks in order, across the stages."""
        return nn.ModuleList(block for stage in self.stages for block in stage.blocks)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def forward_features(self, images: Tensor) -> list[Tensor]:
        """The map after each stage, ``[batch, width_i, H_i, W_i]`` (``H_1 = ceil(H / patch_size)``, each
        next stage half the side); the last map after the final LayerNorm."""
        p = self.config.patch_size
        h, w = images.shape[-2:]
        if h % p or w % p:
            images = F.pad(images, (0, (-w) % p, 0, (-h) % p))
        x = self.patch_norm(self.patch_embed(images))  # [batch, tokens, C]
        x = x.view(x.shape[0], *self.patch_embed.grid(*images.shape[-2:]), -1)  # [batch, H/p, W/p, C]
        maps = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i == len(self.stages) - 1:
                x = self.norm(x)
            maps.append(x.permute(0, 3, 1, 2))
        return maps

    def forward(self, images: Tensor) -> Tensor:
        """Pooled feature ``[batch, width]``: the mean of the normalised last map."""
        return self.forward_features(images)[-1].mean(dim=(2, 3))


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)

