"""TimeSformer (Bertasius et al. 2021): a ViT over the patches of every frame with space-time attention, for
video classification. Initialisable from an image :class:`~vlkit.modules.encoders.vit.VisionTransformer`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlkit.models.preprocess import Preprocess
from vlkit.modules.encoders.vit import VisionConfig, VisionTransformer
from vlkit.modules.layers.patch_embed import PatchEmbed
from vlkit.modules.layers.pos_embed import resample_grid
from vlkit.modules.layers.space_time import ATTENTIONS, SpaceTimeBlock

VIDEO_MEAN = (0.45, 0.45, 0.45)
VIDEO_STD = (0.225, 0.225, 0.225)


def _default_preprocess() -> Preprocess:
    return Preprocess(image_size=224, mean=VIDEO_MEAN, std=VIDEO_STD)


@dataclass
class TimeSformerConfig:
    """Sizes and switches of a :class:`TimeSformer`.

    Attributes:
        image_size, patch_size: frame and patch sides.
        frames: frames per clip the time embedding is made for (other counts are interpolated).
        width, layers, heads, mlp_ratio, act, norm_eps: the transformer.
        attention: ``divided``, ``joint`` or ``space`` (see :mod:`vlkit.modules.layers.space_time`).
        num_classes: outputs of the classification head (0: no head, features only).
        dropout: dropout before the head.
        embed_std: standard deviation of the position and time embeddings of a model built from scratch
            (:meth:`TimeSformer.load_image_weights` replaces them). Large enough for where and when a patch is to
            be visible beside its content from the first step: on the synthetic actions (``timesformer_synth``)
            a tiny model reached 92% test top-1 in 1000 steps with 0.5, and 60% in 1600 steps with 0.01,
            where the order of frames had not yet been picked up.
        preprocess: frame size and normalisation.
    """

    image_size: int = 224
    patch_size: int = 16
    frames: int = 8
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    act: str = "gelu"
    norm_eps: float = 1e-6
    attention: str = "divided"
    num_classes: int = 400
    dropout: float = 0.0
    embed_std: float = 0.5
    preprocess: Preprocess = field(default_factory=_default_preprocess)

    @property
    def embed_dim(self) -> int:
        """Width of :meth:`TimeSformer.encode_video` features."""
        return self.width

    def vision(self) -> VisionConfig:
        """The :class:`VisionConfig` of the image ViT whose weights fit this model."""
        return VisionConfig(image_size=self.image_size, patch_size=self.patch_size, width=self.width,
                            layers=self.layers, heads=self.heads, mlp_ratio=self.mlp_ratio, act=self.act,
                            norm_eps=self.norm_eps, pool="cls")


class TimeSformer(nn.Module):
    """Videos ``[batch, frames, 3, H, W]`` to class logits ``[batch, num_classes]``.

    The patches of every frame get the ViT's spatial position embedding and, except in ``space`` attention, a
    time embedding per frame. The clip feature is the class token after ``ln_post``; in
    ``space`` attention each frame has its own class token and the clip feature is their mean.

    Args:
        config: the sizes.
    """

    architecture = "timesformer"
    config_class = TimeSformerConfig
    #: learning-rate groups: the backbone at ``lr_image``, the classification head at ``lr_head``
    LR_GROUPS = {"image": ("patch_embed.", "class_embedding", "pos_embed", "time_embed", "ln_pre.", "blocks.",
                           "ln_post.")}

    def __init__(self, config: TimeSformerConfig):
        super().__init__()
        if config.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {config.attention!r}")
        self.config = config
        w = config.width
        self.patch_embed = PatchEmbed(config.patch_size, w)
        self.grid = (config.image_size // config.patch_size,) * 2
        self.class_embedding = nn.Parameter(torch.randn(w) * w**-0.5)
        self.pos_embed = nn.Parameter(torch.randn(1 + self.grid[0] * self.grid[1], w) * config.embed_std)
        self.time_embed = nn.Parameter(torch.randn(config.frames, w) * config.embed_std)
        self.ln_pre = nn.LayerNorm(w, eps=config.norm_eps)
        self.blocks = nn.ModuleList(
            SpaceTimeBlock(w, config.heads, config.attention, config.mlp_ratio, config.act, config.norm_eps)
            for _ in range(config.layers)
        )
        self.ln_post = nn.LayerNorm(w, eps=config.norm_eps)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(w, config.num_classes) if config.num_classes > 0 else nn.Identity()

    @property
    def width(self) -> int:
        return self.config.width

    @property
    def preprocess(self) -> Preprocess:
        return self.config.preprocess

    def _time_embed(self, frames: int) -> Tensor:
        if frames == self.config.frames:
            return self.time_embed
        t = self.time_embed.t()[None]  # [1, width, frames]
        return F.interpolate(t, size=frames, mode="linear", align_corners=False)[0].t()  # [frames, width]

    def _embed(self, video: Tensor) -> Tensor:
        b, t = video.shape[:2]
        x = self.patch_embed(video.flatten(0, 1))  # [b*T, N, width]
        grid = self.patch_embed.grid(video.shape[-2], video.shape[-1])
        pos = resample_grid(self.pos_embed, self.grid, grid).to(x.dtype)  # [1 + N, width]
        cls = self.class_embedding.to(x.dtype) + pos[0]  # [width]
        x = x + pos[1:]
        n, w = x.shape[1], x.shape[2]
        if self.config.attention == "space":
            x = torch.cat([cls[None, None].expand(b * t, 1, w), x], dim=1)  # [b*T, 1 + N, width]
            return self.ln_pre(x)
        x = x.reshape(b, t, n, w) + self._time_embed(t).to(x.dtype)[None, :, None]
        x = torch.cat([cls[None, None].expand(b, 1, w), x.reshape(b, t * n, w)], dim=1)  # [b, 1 + T*N, width]
        return self.ln_pre(x)

    def forward_features(self, video: Tensor) -> Tensor:
        """Token features after the blocks (before ``ln_post``): ``[batch, 1 + frames*patches, width]``, or
        ``[batch*frames, 1 + patches, width]`` with ``space`` attention."""
        if video.dim() != 5:
            raise ValueError(f"videos must be [batch, frames, 3, H, W], got shape {tuple(video.shape)}")
        frames = video.shape[1]
        x = self._embed(video)
        for block in self.blocks:
            x = block(x, frames)
        return x

    def encode_video(self, video: Tensor) -> Tensor:
        """The clip feature ``[batch, width]`` (class token after ``ln_post``)."""
        b = video.shape[0]
        x = self.forward_features(video)
        if self.config.attention == "space":
            return self.ln_post(x[:, 0]).reshape(b, -1, self.width).mean(dim=1)
        return self.ln_post(x[:, 0])

    def forward(self, video: Tensor) -> Tensor:
        """Class logits ``[batch, num_classes]`` (features if the model has no head)."""
        return self.head(self.dropout(self.encode_video(video)))

    def load_image_weights(self, vit: VisionTransformer) -> None:
        """Initialise from an image ViT of the same sizes: patch, class and position embeddings, norms and
        blocks are copied; each temporal attention starts as a copy of its block's spatial attention (as the
        paper does) with ``temporal_fc`` zero, and the time embedding is zero, so a clip of identical frames
        gives the image model's feature.

        Raises:
            ValueError: the ViT's sizes differ.
        """
        vc = vit.config
        mine = self.config.vision()
        for name in ("patch_size", "width", "layers", "heads", "mlp_ratio", "act", "norm_eps"):
            if getattr(vc, name) != getattr(mine, name):
                raise ValueError(f"image ViT {name}={getattr(vc, name)} does not fit TimeSformer "
                                 f"{name}={getattr(mine, name)}")
        if vc.qk_norm or vc.parallel or not vc.bias:
            raise ValueError("image ViT with qk_norm, parallel blocks or no biases does not fit TimeSformer")
        with torch.no_grad():
            self.patch_embed.load_state_dict(vit.patch_embed.state_dict())
            self.class_embedding.copy_(vit.class_embedding)
            self.pos_embed.copy_(resample_grid(vit.pos_embed, vit.grid, self.grid))
            self.ln_pre.load_state_dict(vit.ln_pre.state_dict())
            self.ln_post.load_state_dict(vit.ln_post.state_dict())
            self.time_embed.zero_()
            for block, image_block in zip(self.blocks, vit.blocks):
                for part in ("ln_1", "attn", "ln_2", "mlp"):
                    getattr(block, part).load_state_dict(getattr(image_block, part).state_dict())
                if block.attention == "divided":
                    block.temporal_ln.load_state_dict(image_block.ln_1.state_dict())
                    block.temporal_attn.load_state_dict(image_block.attn.state_dict())
                    block.temporal_fc.weight.zero_()
                    block.temporal_fc.bias.zero_()
