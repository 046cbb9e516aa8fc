"""A BriVL-style two-tower model (Huo et al. 2021, "WenLan").

Image side: CNN backbone -> feature map -> multi-scale patch pooling (the whole image and a grid of regions)
-> self-attention over the region features -> pooled -> MLP. Text side: a pretrained text encoder -> its
token features -> self-attention -> masked mean -> MLP. Optionally, momentum copies of the trainable parts
and feature queues (see :class:`vlkit.modules.losses.momentum.MomentumContrastiveLoss`) give many more
negatives than the batch holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlkit.errors import VlkitError
from vlkit.models.outputs import TwoTowerOutput
from vlkit.models.preprocess import Preprocess
from vlkit.modules.encoders.efficientnet import efficientnet_lite0
from vlkit.modules.encoders.hf_text import MINILM, HFTextEncoder
from vlkit.modules.encoders.swin import SwinConfig, SwinTransformer
from vlkit.modules.layers.mlp import MLP
from vlkit.modules.layers.mspp import MultiScalePatchPooling
from vlkit.modules.layers.transformer import Transformer, TransformerEncoderLayer


def _default_preprocess() -> Preprocess:
    return Preprocess(image_size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), context_length=32,
                      tokenizer=None)


@dataclass
class BriVLConfig:
    """Sizes and training switches of a :class:`BriVL`."""

    embed_dim: int = 256
    backbone: str = "efficientnet_lite0"  # or "swin": the Swin Transformer of ``swin`` (no pretrained weights)
    backbone_pretrained: bool = True
    trainable_backbone_blocks: int = 0  # top blocks (and the head conv) of the CNN to train; 0 = frozen
    # (swin: top Swin blocks and the final norm; at least its number of blocks trains the whole backbone)
    swin: SwinConfig | None = None  # the sizes of a "swin" backbone (None: Swin-T)
    mspp_scales: tuple[int, ...] = (1, 6)
    image_width: int = 384
    image_layers: int = 2
    image_heads: int = 6
    text_encoder: str = MINILM  # a local Hugging Face directory, or "minilm" (the packaged all-MiniLM-L6-v2)
    text_pooling: str = "mean"
    trainable_text_layers: int = 0  # top layers of the pretrained text encoder to train; 0 = frozen
    text_width: int = 384
    text_layers: int = 2
    text_heads: int = 6
    mlp_ratio: float = 2.0
    dropout: float = 0.1
    momentum: float = 0.0  # > 0: momentum encoders (e.g. 0.995) and feature queues
    queue_size: int = 4096
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0
    preprocess: Preprocess = field(default_factory=_default_preprocess)


def _zero_last(mlp: MLP) -> MLP:
    nn.init.zeros_(mlp.fc2.weight)
    nn.init.zeros_(mlp.fc2.bias)
    return mlp


class _ImageHead(nn.Module):
    """Region features -> self-attention -> pooled -> MLP, added to a linear map of the whole-image feature.

    The MLP branch starts at zero, so training starts from a linear probe of the pretrained global feature
    (a strong start on small data) and the attention over regions adds what the probe cannot express.
    """

    def __init__(self, c: BriVLConfig, in_dim: int, num_regions: int):
        super().__init__()
        self.skip = nn.Linear(in_dim, c.embed_dim)
        self.proj = nn.Linear(in_dim, c.image_width)
        self.pos_embed = nn.Parameter(torch.randn(num_regions, c.image_width) * 0.02)
        self.encoder = Transformer([TransformerEncoderLayer(c.image_width, c.image_heads, 4.0, "gelu", 1e-6, c.dropout)
                                    for _ in range(c.image_layers)])
        self.norm = nn.LayerNorm(c.image_width, eps=1e-6)
        self.mlp = _zero_last(MLP(c.image_width, int(c.image_width * c.mlp_ratio), "gelu", c.dropout,
                                  out_dim=c.embed_dim))

    def forward(self, regions: Tensor) -> Tensor:
        x = self.proj(regions) + self.pos_embed  # [batch, regions, width]
        x = self.norm(self.encoder(x))
        return self.skip(regions[:, 0]) + self.mlp(x.mean(dim=1))  # [batch, embed_dim]; region 0 = whole image


class _TextHead(nn.Module):
    """Token features -> self-attention (padding masked) -> masked mean -> MLP, added to a linear map of the
    encoder's mean-pooled sentence feature (the MLP branch starts at zero, as in :class:`_ImageHead`)."""

    def __init__(self, c: BriVLConfig, in_dim: int):
        super().__init__()
        self.skip = nn.Linear(in_dim, c.embed_dim)
        self.proj = nn.Linear(in_dim, c.text_width)
        self.encoder = Transformer([TransformerEncoderLayer(c.text_width, c.text_heads, 4.0, "gelu", 1e-6, c.dropout)
                                    for _ in range(c.text_layers)])
        self.norm = nn.LayerNorm(c.text_width, eps=1e-6)
        self.mlp = _zero_last(MLP(c.text_width, int(c.text_width * c.mlp_ratio), "gelu", c.dropout,
                                  out_dim=c.embed_dim))

    def forward(self, tokens: Tensor, attention_mask: Tensor) -> Tensor:
        mask = attention_mask.to(tokens.dtype)[..., None]  # [batch, length, 1]
        count = mask.sum(dim=1).clamp(min=1.0)
        x = self.proj(tokens)  # [batch, length, width]
        x = self.norm(self.encoder(x, key_padding_mask=attention_mask))
        return self.skip((tokens * mask).sum(dim=1) / count) + self.mlp((x * mask).sum(dim=1) / count)


class BriVL(nn.Module):
    """The BriVL-style two-tower model.

    Args:
        config: sizes and switches.
        load_pretrained_encoders: load the ImageNet backbone and the pretrained text encoder (False when the
            whole model's weights are loaded afterwards, as :func:`vlkit.models.io.load_model` does).
    """

    architecture = "brivl"
    config_class = BriVLConfig
    #: pretrained encoders get the tower learning rates; MSPP, self-attention and MLP heads the head rate
    LR_GROUPS = {"image": ("backbone.",), "text": ("text_backbone.",)}

    def __init__(self, config: BriVLConfig, load_pretrained_encoders: bool = True):
        super().__init__()
        if config.backbone not in ("efficientnet_lite0", "swin"):
            raise VlkitError(f"unknown BriVL backbone {config.backbone!r}; available: efficientnet_lite0, swin")
        if config.backbone == "swin" and config.backbone_pretrained:
            raise VlkitError("BriVL backbone swin has no pretrained weights: set backbone_pretrained=false "
                             "(and trainable_backbone_blocks to train it)")
        self.config = config
        pretrained = config.backbone_pretrained and load_pretrained_encoders
        if config.backbone == "swin":
            self.backbone = SwinTransformer(config.swin or SwinConfig())
        else:
            self.backbone = efficientnet_lite0(pretrained=pretrained, num_classes=0)
        self.text_backbone = HFTextEncoder(config.text_encoder, config.text_pooling,
                                           load_weights=load_pretrained_encoders)
        if config.preprocess.tokenizer is None:
            config.preprocess.tokenizer = config.text_encoder  # the text encoder's own tokenizer
        self.mspp = MultiScalePatchPooling(config.mspp_scales)
        self.image_head = _ImageHead(config, self.backbone.num_features, self.mspp.num_regions)
        self.text_head = _TextHead(config, self.text_backbone.width)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.init_temperature)))
        self._freeze()
        self.momentum_heads: nn.ModuleDict | None = None
        self.queue = None
        if config.momentum > 0:
            from vlkit.modules.losses.momentum import MomentumContrastiveLoss, make_momentum_copy

            self.momentum_heads = nn.ModuleDict({"image": make_momentum_copy(self.image_head),
                                                 "text": make_momentum_copy(self.text_head)})
            self.queue = MomentumContrastiveLoss(config.embed_dim, config.queue_size, config.init_temperature,
                                                 config.max_logit_scale)

    # ----------------------------------------------------------------- freezing
    def _freeze(self) -> None:
        c = self.config
        self.backbone.requires_grad_(False)
        if c.backbone == "swin" and c.trainable_backbone_blocks > 0:
            blocks = self.backbone.blocks
            if c.trainable_backbone_blocks >= len(blocks):
                self.backbone.requires_grad_(True)
            else:
                for block in blocks[-c.trainable_backbone_blocks:]:
                    block.requires_grad_(True)
                self.backbone.norm.requires_grad_(True)
        elif c.trainable_backbone_blocks > 0:
            for block in self.backbone._blocks[-c.trainable_backbone_blocks:]:
                block.requires_grad_(True)
            self.backbone._conv_head.requires_grad_(True)
            self.backbone._bn1.requires_grad_(True)
        self.text_backbone.requires_grad_(False)
        if c.trainable_text_layers > 0:
            for layer in self.text_backbone.blocks[-c.trainable_text_layers:]:
                layer.requires_grad_(True)

    def train(self, mode: bool = True) -> "BriVL":
        """Frozen pretrained parts stay in eval mode (batch-norm statistics and dropout unchanged)."""
        super().train(mode)
        if mode:
            if self.config.trainable_backbone_blocks == 0:
                self.backbone.eval()
            if self.config.trainable_text_layers == 0:
                self.text_backbone.eval()
        return self

    @property
    def preprocess(self) -> Preprocess:
        return self.config.preprocess

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)
        self.image_head.encoder.grad_checkpointing = enable
        self.text_head.encoder.grad_checkpointing = enable

    # ----------------------------------------------------------------- towers
    def image_regions(self, images: Tensor) -> Tensor:
        """``[batch, 3, H, W]`` -> MSPP region features ``[batch, regions, 1280]``."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.config.trainable_backbone_blocks > 0):
            fmap = self.backbone.forward_features(images)  # [batch, 1280, H/32, W/32]
        if isinstance(fmap, list):  # a Swin backbone's stage maps: pool the last, [batch, width, H/32, W/32]
            fmap = fmap[-1]
        return self.mspp(fmap)

    def text_tokens(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.config.trainable_text_layers > 0):
            return self.text_backbone.forward_features(input_ids, attention_mask)  # [batch, length, width]

    def encode_image(self, images: Tensor, normalize: bool = True) -> Tensor:
        x = self.image_head(self.image_regions(images))
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None, normalize: bool = True) -> Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        x = self.text_head(self.text_tokens(input_ids, attention_mask), attention_mask)
        return F.normalize(x, dim=-1) if normalize else x

    def scale(self) -> Tensor:
        return self.logit_scale.exp().clamp(max=self.config.max_logit_scale)

    def forward(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> TwoTowerOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        regions = self.image_regions(images)
        tokens = self.text_tokens(input_ids, attention_mask)
        out = TwoTowerOutput(F.normalize(self.image_head(regions), dim=-1),
                             F.normalize(self.text_head(tokens, attention_mask), dim=-1), self.scale())
        if self.momentum_heads is not None and self.training:
            with torch.no_grad():
                out.image_embeds_m = F.normalize(self.momentum_heads["image"](regions.detach()), dim=-1)
                out.text_embeds_m = F.normalize(self.momentum_heads["text"](tokens.detach(), attention_mask), dim=-1)
        return out

    @torch.no_grad()
    def momentum_step(self) -> None:
        """Move the momentum heads towards the online heads (call after each optimizer step)."""
        if self.momentum_heads is None:
            return
        from vlkit.modules.losses.momentum import momentum_update

        momentum_update(self.image_head, self.momentum_heads["image"], self.config.momentum)
        momentum_update(self.text_head, self.momentum_heads["text"], self.config.momentum)

    def towers(self) -> dict[str, nn.Module]:
        return {"image": nn.ModuleList([self.backbone, self.image_head]),
                "text": nn.ModuleList([self.text_backbone, self.text_head])}

    def tower_blocks(self, tower: str) -> nn.ModuleList:
        return self.image_head.encoder.layers if tower == "image" else self.text_head.encoder.layers
