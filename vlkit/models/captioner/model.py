"""A BLIP-style image captioner: image tokens from a CNN (or a small ViT), projected to the width of a BERT-shaped
decoder that cross-attends to them and writes the caption token by token.

With ``captioner-lite0-minilm`` the image tokens are the 7x7 cells of EfficientNet-Lite0's last feature map (or
BriVL's multi-scale regions) and the decoder starts from all-MiniLM-L6-v2, both pretrained and offline; the
cross-attention layers, the projection and the language-model head's transform are new.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from vlkit.errors import VlkitError
from vlkit.inference.interface import GenerationSpec
from vlkit.models.preprocess import Preprocess
from vlkit.modules.decoders.bert_decoder import BertTextDecoder
from vlkit.modules.decoders.transformer_decoder import text_decoder
from vlkit.modules.encoders.efficientnet import efficientnet_lite0
from vlkit.modules.encoders.hf_text import MINILM, resolve_text_encoder_path
from vlkit.modules.encoders.vit import VisionConfig, VisionTransformer
from vlkit.modules.layers.decoder_cache import DecoderCache
from vlkit.modules.layers.mspp import MultiScalePatchPooling
from vlkit.modules.layers.pos_embed import resample_grid

CNN_STRIDE = 32  # EfficientNet's last feature map is 1/32 of the image side


def _default_preprocess() -> Preprocess:
    return Preprocess(image_size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), context_length=32,
                      tokenizer=None)


@dataclass
class CaptionerConfig:
    """Sizes, token ids and training switches of a :class:`Captioner`.

    Attributes:
        image_encoder: ``efficientnet_lite0`` (pretrained CNN) or ``vit`` (a small random ViT).
        backbone_pretrained: load the CNN's ImageNet weights.
        trainable_backbone_blocks: top CNN blocks (and its head conv) to train; 0 = frozen, as in BriVL.
        image_tokens: CNN tokens: ``grid`` (every cell of the last feature map: 7x7 at 224 px) or ``mspp``
            (BriVL's multi-scale regions at ``mspp_scales``).
        mspp_scales: grid sides of the MSPP regions.
        image_size, patch_size, vision_width, vision_layers, vision_heads: the ViT (``image_encoder="vit"``).
        decoder: ``bert`` (post-norm, BERT-shaped, :class:`BertTextDecoder`) or ``transformer`` (the generic
            pre-norm :class:`~vlkit.modules.decoders.transformer_decoder.TransformerTextDecoder`, random).
        text_decoder: a local BERT directory or ``minilm`` to start the ``bert`` decoder from; its sizes replace
            the ``vocab_size`` / ``decoder_*`` fields. None: a random decoder of those sizes.
        trainable_text_layers: top decoder layers whose pretrained parts train; -1 = the whole decoder (the
            embeddings and the tied output projection too). Cross-attention and the head always train.
        vocab_size, decoder_width, decoder_layers, decoder_heads, decoder_mlp_dim: the decoder's sizes.
        max_positions: most tokens of a caption, the start and end tokens included.
        bos_token_id, eos_token_id, pad_token_id: start ([CLS]), end ([SEP]) and padding ids.
        dropout: dropout of the decoder and of the image tokens while training.
    """

    image_encoder: str = "efficientnet_lite0"
    backbone_pretrained: bool = True
    trainable_backbone_blocks: int = 0
    image_tokens: str = "grid"
    mspp_scales: tuple[int, ...] = (1, 6)
    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 384
    vision_layers: int = 6
    vision_heads: int = 6
    decoder: str = "bert"
    text_decoder: str | None = MINILM
    trainable_text_layers: int = -1
    vocab_size: int = 30522
    decoder_width: int = 384
    decoder_layers: int = 6
    decoder_heads: int = 12
    decoder_mlp_dim: int = 1536
    max_positions: int = 64
    bos_token_id: int = 101
    eos_token_id: int = 102
    pad_token_id: int = 0
    dropout: float = 0.1
    preprocess: Preprocess = field(default_factory=_default_preprocess)


class Captioner(nn.Module):
    """Image -> tokens -> projection -> cross-attending text decoder (see the module docstring).

    Implements the decoding interface of :mod:`vlkit.inference.interface`, so
    :func:`vlkit.inference.generate.generate` writes captions with it.

    Args:
        config: sizes and switches.
        load_pretrained_encoders: load the CNN's and the decoder's pretrained weights (False when the whole
            model's weights are loaded afterwards, as :func:`vlkit.models.io.load_model` does).
    """

    architecture = "captioner"
    config_class = CaptionerConfig

    def __init__(self, config: CaptionerConfig, load_pretrained_encoders: bool = True):
        super().__init__()
        c = self.config = config
        if c.image_encoder not in ("efficientnet_lite0", "vit"):
            raise VlkitError(f"unknown captioner image_encoder {c.image_encoder!r}; available: efficientnet_lite0, vit")
        if c.image_tokens not in ("grid", "mspp"):
            raise VlkitError(f"image_tokens must be 'grid' or 'mspp', got {c.image_tokens!r}")
        if c.decoder not in ("bert", "transformer"):
            raise VlkitError(f"unknown captioner decoder {c.decoder!r}; available: bert, transformer")
        self.decoder = self._build_decoder(load_pretrained_encoders)
        width = c.decoder_width
        self.mspp = None
        if c.image_encoder == "vit":
            if c.image_tokens == "mspp":
                raise VlkitError("image_tokens 'mspp' pools a CNN feature map; the vit encoder gives 'grid' tokens")
            self.visual = VisionTransformer(VisionConfig(c.image_size, c.patch_size, c.vision_width, c.vision_layers,
                                                         c.vision_heads, act="gelu", norm_eps=1e-6))
            in_dim, self.grid, num_tokens = c.vision_width, None, 0  # the ViT has positions of its own
        else:
            self.visual = efficientnet_lite0(pretrained=c.backbone_pretrained and load_pretrained_encoders,
                                             num_classes=0)
            in_dim = self.visual.num_features
            if c.image_tokens == "mspp":
                self.mspp = MultiScalePatchPooling(c.mspp_scales)
                self.grid, num_tokens = None, self.mspp.num_regions
            else:
                side = c.preprocess.image_size // CNN_STRIDE
                self.grid, num_tokens = (side, side), side * side
        self.image_proj = nn.Linear(in_dim, width)
        self.image_pos = nn.Parameter(torch.randn(num_tokens, width) * 0.02) if num_tokens else None
        self.image_norm = nn.LayerNorm(width, eps=1e-6)
        self.image_drop = nn.Dropout(c.dropout)
        if c.preprocess.tokenizer is None and c.text_decoder is not None:
            c.preprocess.tokenizer = c.text_decoder  # the pretrained decoder's own WordPiece tokenizer
        self._freeze()
        self.LR_GROUPS = self._lr_groups()

    def _build_decoder(self, load_weights: bool) -> nn.Module:
        c = self.config
        if c.decoder == "transformer":
            if c.text_decoder is not None:
                raise VlkitError("the 'transformer' decoder starts random: set text_decoder=None (a pretrained "
                                 f"BERT such as {c.text_decoder!r} starts the 'bert' decoder)")
            return text_decoder(c.vocab_size, c.decoder_width, c.decoder_layers, c.decoder_heads,
                                max_length=c.max_positions, mlp_ratio=c.decoder_mlp_dim / c.decoder_width)
        if c.text_decoder is None:
            return BertTextDecoder(c.vocab_size, c.decoder_width, c.decoder_layers, c.decoder_heads, c.decoder_mlp_dim,
                                   c.max_positions, dropout=c.dropout)
        path = resolve_text_encoder_path(c.text_decoder)
        if load_weights:
            decoder = BertTextDecoder.from_hf_bert(path, max_positions=c.max_positions, dropout=c.dropout)
        else:
            hf = json.loads((path / "config.json").read_text())
            decoder = BertTextDecoder(hf["vocab_size"], hf["hidden_size"], hf["num_hidden_layers"],
                                      hf["num_attention_heads"], hf["intermediate_size"],
                                      min(c.max_positions, hf["max_position_embeddings"]),
                                      act=hf.get("hidden_act", "gelu"), norm_eps=hf.get("layer_norm_eps", 1e-12),
                                      dropout=c.dropout)
        # the checkpoint decides the sizes; the saved config records them
        c.vocab_size, c.decoder_width, c.decoder_layers = decoder.vocab_size, decoder.dim, decoder.num_layers
        c.decoder_heads, c.decoder_mlp_dim, c.max_positions = decoder.num_heads, decoder.mlp_dim, decoder.max_positions
        return decoder

    # ----------------------------------------------------------------- freezing and learning rates
    def _pretrained_text_prefixes(self) -> tuple[str, ...]:
        """Names of the decoder's parameters a language model provides: all but cross-attention and the
        BERT head's transform and output bias (new in a captioner)."""
        new = (".cross_attn.", ".ln_cross.")
        return tuple(f"decoder.{n}" for n, _ in self.decoder.named_parameters()
                     if not any(part in n for part in new) and not n.startswith(("head.", "lm_bias")))

    def _lr_groups(self) -> dict[str, tuple[str, ...]]:
        """The image encoder at the image rate, the decoder's BERT parts at the text rate; the new parts
        (projection, cross-attention, head transform, output bias) at the head rate."""
        return {"image": ("visual.",), "text": self._pretrained_text_prefixes()}

    def _freeze(self) -> None:
        c = self.config
        if c.image_encoder == "efficientnet_lite0":
            self.visual.requires_grad_(False)
            if c.trainable_backbone_blocks > 0:
                for block in self.visual._blocks[-c.trainable_backbone_blocks:]:
                    block.requires_grad_(True)
                self.visual._conv_head.requires_grad_(True)
                self.visual._bn1.requires_grad_(True)
        if c.trainable_text_layers >= 0:
            layers = len(self.decoder.layers)
            keep = {f"decoder.layers.{i}." for i in range(layers - c.trainable_text_layers, layers)}
            frozen = self._pretrained_text_prefixes()
            for name, param in self.named_parameters():
                if name.startswith(frozen) and not name.startswith(tuple(keep)):
                    param.requires_grad_(False)

    def train(self, mode: bool = True) -> "Captioner":
        """A frozen CNN stays in eval mode (batch-norm statistics unchanged)."""
        super().train(mode)
        if mode and self.config.image_encoder == "efficientnet_lite0" and self.config.trainable_backbone_blocks == 0:
            self.visual.eval()
        return self

    @property
    def preprocess(self) -> Preprocess:
        return self.config.preprocess

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)

    # ----------------------------------------------------------------- image side
    def image_features(self, images: Tensor) -> Tensor:
        """``[batch, 3, H, W]`` -> encoder tokens ``[batch, tokens, features]`` before the projection."""
        if self.config.image_encoder == "vit":
            return self.visual.ln_post(self.visual.forward_features(images))  # [batch, 1 + patches, width]
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.config.trainable_backbone_blocks > 0):
            fmap = self.visual.forward_features(images)  # [batch, 1280, H/32, W/32]
        if self.mspp is not None:
            return self.mspp(fmap)  # [batch, regions, 1280]
        return fmap.flatten(2).transpose(1, 2)  # [batch, cells, 1280], row by row

    def image_context(self, images: Tensor) -> Tensor:
        """The tokens the decoder cross-attends to, ``[batch, tokens, decoder width]``."""
        feats = self.image_features(images)
        x = self.image_proj(feats)  # [batch, tokens, width]
        if self.image_pos is not None:
            pos = self.image_pos
            if self.grid is not None:
                side = (images.shape[-2] // CNN_STRIDE, images.shape[-1] // CNN_STRIDE)
                if side[0] * side[1] == feats.shape[1]:
                    pos = resample_grid(pos, self.grid, side, num_prefix=0)
            x = x + pos.to(x.dtype)
        return self.image_drop(self.image_norm(x))

    # ----------------------------------------------------------------- decoding interface
    @property
    def generation(self) -> GenerationSpec:
        c = self.config
        return GenerationSpec(c.bos_token_id, c.eos_token_id, c.pad_token_id, c.max_positions, c.vocab_size)

    def start_decoding(self, images: Tensor, max_length: int) -> DecoderCache:
        """Encode ``images`` once; a cache holding the cross-attention keys/values over their tokens."""
        return self.decoder.start(self.image_context(images), None, max_length)

    def decode_step(self, input_ids: Tensor, cache: DecoderCache) -> Tensor:
        """Logits ``[batch, new, vocab]`` of the tokens ``[batch, new]`` after those ``cache`` holds."""
        return self.decoder.step(input_ids, cache)

    def caption_logits(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Teacher forcing: ``[batch, length, vocab]``, position ``t`` predicting token ``t + 1``."""
        return self.decoder(input_ids, self.image_context(images), None, attention_mask)

    def forward(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None,
                head: str = "caption") -> Tensor:
        """The caption logits (see :meth:`caption_logits`); through ``forward`` so DDP wrappers see the call.

        Raises:
            VlkitError: ``head`` is not ``caption``.
        """
        if head != "caption":
            raise VlkitError(f"the captioner has one head, 'caption', not {head!r}")
        return self.caption_logits(images, input_ids, attention_mask)
