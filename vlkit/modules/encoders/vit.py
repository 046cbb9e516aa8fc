"""A CLIP-style Vision Transformer: patch embedding, class token, learned positions, pre-norm blocks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vlkit.modules.layers.patch_dropout import PatchDropout
from vlkit.modules.layers.patch_embed import PatchEmbed
from vlkit.modules.layers.pos_embed import resample_grid
from vlkit.modules.layers.transformer import Transformer, TransformerEncoderLayer


@dataclass
class VisionConfig:
    """Sizes of a :class:`VisionTransformer`."""

    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    act: str = "quick_gelu"
    norm_eps: float = 1e-5
    patch_dropout: float = 0.0
    pool: str = "cls"  # "cls" (class token) or "mean" (mean of patch tokens)
    # options from ViT-22B (Dehghani et al. 2023); the defaults are the classic ViT
    qk_norm: bool = False  # LayerNorm on each head's queries and keys
    parallel: bool = False  # attention and MLP in parallel on one LayerNorm
    bias: bool = True  # biases on the attention and MLP projections


class VisionTransformer(nn.Module):
    """Images ``[batch, 3, H, W]`` to a pooled feature ``[batch, width]`` (before any projection).

    Images of another size than ``config.image_size`` are accepted: the position grid is resampled.

    Args:
        config: the sizes.
    """

    def __init__(self, config: VisionConfig):
        super().__init__()
        if config.pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {config.pool!r}")
        self.config = config
        w = config.width
        self.patch_embed = PatchEmbed(config.patch_size, w)
        self.grid = (config.image_size // config.patch_size,) * 2
        self.class_embedding = nn.Parameter(torch.randn(w) * w**-0.5)
        self.pos_embed = nn.Parameter(torch.randn(1 + self.grid[0] * self.grid[1], w) * 0.01)
        self.patch_dropout = PatchDropout(config.patch_dropout, num_prefix=1)
        self.ln_pre = nn.LayerNorm(w, eps=config.norm_eps)
        self.transformer = Transformer(
            [TransformerEncoderLayer(w, config.heads, config.mlp_ratio, config.act, config.norm_eps,
                                     qk_norm=config.qk_norm, parallel=config.parallel, bias=config.bias)
             for _ in range(config.layers)]
        )
        self.ln_post = nn.LayerNorm(w, eps=config.norm_eps)

    @property
    def width(self) -> int:
        return self.config.width

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.layers

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def forward_features(self, images: Tensor) -> Tensor:
        """Token features ``[batch, 1 + patches, width]`` after the blocks (before ``ln_post``)."""
        return self.transformer(self._embed(images))

    def _embed(self, images: Tensor) -> Tensor:
        x = self.patch_embed(images)  # [batch, patches, width]
        grid = self.patch_embed.grid(images.shape[-2], images.shape[-1])
        pos = resample_grid(self.pos_embed, self.grid, grid)
        cls = self.class_embedding.to(x.dtype)[None, None].expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + pos.to(x.dtype)  # [batch, 1 + patches, width]
        return self.ln_pre(self.patch_dropout(x))

    def pool(self, tokens: Tensor) -> Tensor:
        """Pooled, normalised feature ``[batch, width]`` from :meth:`forward_features` output."""
        pooled = tokens[:, 0] if self.config.pool == "cls" else tokens[:, 1:].mean(dim=1)
        return self.ln_post(pooled)

    def forward(self, images: Tensor) -> Tensor:
        """Pooled feature ``[batch, width]``. With class-token pooling the last block is computed for the
        class token only (its other outputs are never read)."""
        if self.config.pool == "cls":
            x = self._embed(images)
            index = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
            return self.ln_post(self.transformer(x, output_index=index)[:, 0])
        return self.pool(self.forward_features(images))
