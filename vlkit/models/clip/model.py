"""CLIP (Radford et al. 2021): a vision transformer and a text transformer with linear projections into one
embedding space, compared by a scaled cosine similarity."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlkit.models.outputs import TwoTowerOutput
from vlkit.models.preprocess import Preprocess
from vlkit.modules.encoders.swin import SwinConfig, SwinTransformer
from vlkit.modules.encoders.text_transformer import TextConfig, TextTransformer
from vlkit.modules.encoders.vit import VisionConfig, VisionTransformer


@dataclass
class CLIPConfig:
    """Sizes of a :class:`CLIP` and the preprocessing it expects. With ``swin`` set, the image tower is that
    Swin Transformer (mean of its last map) and ``vision`` is unused."""

    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    swin: SwinConfig | None = None
    text: TextConfig = field(default_factory=TextConfig)
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0
    preprocess: Preprocess = field(default_factory=Preprocess)


class CLIP(nn.Module):
    """Vision tower + text tower + projections + learned logit scale.

    Args:
        config: sizes and preprocessing.

    Example:
        >>> model = vlkit.create_model("clip-tiny")
        >>> out = model(images, input_ids)      # TwoTowerOutput
        >>> out.logits_per_image.shape          # [n_images, n_texts]
    """

    architecture = "clip"
    config_class = CLIPConfig
    #: parameter-name prefixes of each tower, for per-tower learning rates (the rest are heads)
    LR_GROUPS = {"image": ("visual.",), "text": ("text.",)}

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        self.visual = SwinTransformer(config.swin) if config.swin is not None else VisionTransformer(config.vision)
        self.text = TextTransformer(config.text)
        self.visual_projection = nn.Linear(self.visual.width, config.embed_dim, bias=False)
        self.text_projection = nn.Linear(config.text.width, config.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.init_temperature)))
        nn.init.normal_(self.visual_projection.weight, std=self.visual.width**-0.5)
        nn.init.normal_(self.text_projection.weight, std=config.text.width**-0.5)

    @property
    def preprocess(self) -> Preprocess:
        return self.config.preprocess

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)

    def encode_image(self, images: Tensor, normalize: bool = True) -> Tensor:
        """``[batch, 3, H, W]`` -> ``[batch, embed_dim]``."""
        x = self.visual_projection(self.visual(images))
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None, normalize: bool = True) -> Tensor:
        """``[batch, length]`` token ids -> ``[batch, embed_dim]``."""
        x = self.text_projection(self.text(input_ids))
        return F.normalize(x, dim=-1) if normalize else x

    def scale(self) -> Tensor:
        """The similarity multiplier: ``exp(logit_scale)`` clamped to ``max_logit_scale``."""
        return self.logit_scale.exp().clamp(max=self.config.max_logit_scale)

    def forward(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> TwoTowerOutput:
        return TwoTowerOutput(self.encode_image(images), self.encode_text(input_ids, attention_mask), self.scale())

    def towers(self) -> dict[str, nn.Module]:
        """The image and text towers (with their projections), for locking (LiT)."""
        return {"image": nn.ModuleList([self.visual, self.visual_projection]),
                "text": nn.ModuleList([self.text, self.text_projection])}

    def tower_blocks(self, tower: str) -> nn.ModuleList:
        return self.visual.blocks if tower == "image" else self.text.blocks

    def load_pretrained(self, path: str | Path) -> None:
        """Load weights from a vlkit directory, an OpenAI or open_clip checkpoint, or a Hugging Face
        ``CLIPModel`` directory (the format is detected from the keys)."""
        from vlkit.models.clip.convert import load_clip_weights

        load_clip_weights(self, path)
