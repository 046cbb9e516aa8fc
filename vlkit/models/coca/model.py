"""CoCa (Yu et al. 2022, "Contrastive Captioners"): a ViT whose tokens are pooled by learned queries, a
unimodal causal text tower with a [CLS] token for the contrastive embedding, and a multimodal decoder that
cross-attends to the pooled image tokens to caption. Its layout follows open_clip's CoCa, so open_clip's
checkpoints load one tensor to one tensor (see :mod:`vlkit.models.coca.convert`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlkit.errors import VlkitError
from vlkit.inference.interface import GenerationSpec
from vlkit.models.coca.decoder import MultimodalDecoder
from vlkit.models.coca.text import CoCaTextEncoder
from vlkit.models.outputs import TwoTowerOutput
from vlkit.models.preprocess import Preprocess
from vlkit.modules.encoders.text_transformer import TextConfig
from vlkit.modules.encoders.vit import VisionConfig, VisionTransformer
from vlkit.modules.layers.attention_pool import AttentionPool
from vlkit.modules.layers.decoder_cache import DecoderCache

CONTRASTIVE_POOLERS = ("first", "separate")


@dataclass
class CoCaConfig:
    """Sizes, token ids and loss weights of a :class:`CoCa` (defaults: open_clip's ``coca_ViT-B-32``).

    Attributes:
        embed_dim: width of the contrastive embeddings and of the pooled image tokens (the decoder's context).
        image_size, patch_size, vision_width, vision_layers, vision_heads: the ViT.
        text_width, text_layers, text_heads: the unimodal text tower.
        decoder_width, decoder_layers, decoder_heads: the multimodal decoder.
        vocab_size: token ids (49408: CLIP's BPE).
        context_length: most text tokens (the [CLS] token takes one more position).
        num_queries: learned queries of the captioning pooler.
        pooler_heads: attention heads of the pooler(s).
        contrastive_pooler: ``first``: the first query of the captioning pooler is the contrastive image
            feature and the other ``num_queries - 1`` are the decoder's context (open_clip's CoCa checkpoints);
            ``separate``: a one-query pooler gives the contrastive feature and all ``num_queries`` are the
            context (the ViT's ``ln_post`` normalises the tokens both poolers read, as open_clip's "parallel").
        legacy_cls_mask: the shifted [CLS] mask open_clip's released CoCa weights were trained with (see
            :class:`~vlkit.models.coca.text.CoCaTextEncoder`).
        bos_token_id, eos_token_id, pad_token_id: start, end and padding tokens.
        caption_loss_weight, contrastive_loss_weight: weights of the two losses in CoCa training.
    """

    embed_dim: int = 512
    image_size: int = 224
    patch_size: int = 32
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    decoder_width: int = 512
    decoder_layers: int = 12
    decoder_heads: int = 8
    mlp_ratio: float = 4.0
    act: str = "gelu"
    norm_eps: float = 1e-5
    vocab_size: int = 49408
    context_length: int = 76
    num_queries: int = 256
    pooler_heads: int = 8
    contrastive_pooler: str = "first"
    legacy_cls_mask: bool = False
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 0
    patch_dropout: float = 0.0
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0
    caption_loss_weight: float = 2.0
    contrastive_loss_weight: float = 1.0
    preprocess: Preprocess = field(default_factory=lambda: Preprocess(context_length=76))


@dataclass
class CoCaOutput:
    """Both heads of one forward pass (image and text each encoded once).

    Attributes:
        image_embeds: L2-normalised image embeddings ``[batch, embed_dim]``.
        text_embeds: L2-normalised text embeddings ``[batch, embed_dim]``.
        logit_scale: the contrastive similarity multiplier.
        logits: next-token logits ``[batch, length, vocab_size]`` (position ``t`` predicts token ``t + 1``).
    """

    image_embeds: Tensor
    text_embeds: Tensor
    logit_scale: Tensor
    logits: Tensor


def _check(c: CoCaConfig) -> None:
    problems = []
    if c.contrastive_pooler not in CONTRASTIVE_POOLERS:
        problems.append(f"contrastive_pooler must be one of {CONTRASTIVE_POOLERS}, got {c.contrastive_pooler!r}")
    if c.contrastive_pooler == "first" and c.num_queries < 2:
        problems.append("contrastive_pooler 'first' needs num_queries >= 2 (one contrastive, the rest context)")
    if c.text_width != c.decoder_width:
        problems.append(f"text_width {c.text_width} and decoder_width {c.decoder_width} must be equal (the decoder "
                        "reads the text tower's tokens)")
    if c.preprocess.context_length > c.context_length:
        problems.append(f"preprocess.context_length {c.preprocess.context_length} exceeds context_length "
                        f"{c.context_length}")
    if problems:
        raise VlkitError("CoCa config: " + "; ".join(problems))


class CoCa(nn.Module):
    """Image tower with attentional pooling, unimodal text tower, multimodal decoder, learned logit scale.

    Args:
        config: sizes, token ids and loss weights.

    Example:
        >>> model = vlkit.create_model("coca-tiny")
        >>> model(images, input_ids).logits_per_image               # contrastive head: TwoTowerOutput
        >>> model(images, input_ids, mask, head="caption").shape   # [batch, length, vocab]
        >>> out = model(images, input_ids, mask, head="coca")        # CoCaOutput: both from one pass
    """

    architecture = "coca"
    config_class = CoCaConfig
    #: parameter-name prefixes per learning-rate group (the decoder goes with the text; the rest are heads)
    LR_GROUPS = {"image": ("visual.", "attn_pool.", "attn_pool_contrastive."), "text": ("text.", "decoder.")}

    def __init__(self, config: CoCaConfig):
        super().__init__()
        c = self.config = config
        _check(c)
        self.visual = VisionTransformer(VisionConfig(
            image_size=c.image_size, patch_size=c.patch_size, width=c.vision_width, layers=c.vision_layers,
            heads=c.vision_heads, mlp_ratio=c.mlp_ratio, act=c.act, norm_eps=c.norm_eps,
            patch_dropout=c.patch_dropout))
        separate = c.contrastive_pooler == "separate"
        if not separate:
            self.visual.ln_post = nn.Identity()  # the pooler's output norm takes its place
        # "first": the pooler's ln_out is open_clip's ln_post; "separate": no norm after the poolers
        self.attn_pool = AttentionPool(c.embed_dim, c.pooler_heads, c.num_queries, c.vision_width, c.norm_eps,
                                       query_norm=True, out_norm=not separate)
        self.attn_pool_contrastive = AttentionPool(c.embed_dim, c.pooler_heads, 1, c.vision_width, c.norm_eps,
                                                   query_norm=True, out_norm=False) if separate else None
        self.visual_projection = nn.Linear(c.embed_dim, c.embed_dim, bias=False)
        self.text = CoCaTextEncoder(TextConfig(
            vocab_size=c.vocab_size, context_length=c.context_length, width=c.text_width, layers=c.text_layers,
            heads=c.text_heads, mlp_ratio=c.mlp_ratio, act=c.act, norm_eps=c.norm_eps,
            eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id), legacy_cls_mask=c.legacy_cls_mask)
        self.text_projection = nn.Linear(c.text_width, c.embed_dim, bias=False)
        self.decoder = MultimodalDecoder(c.decoder_width, c.decoder_layers, c.decoder_heads, c.embed_dim,
                                         c.vocab_size, c.mlp_ratio, c.act, c.norm_eps)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / c.init_temperature)))
        nn.init.normal_(self.visual_projection.weight, std=c.embed_dim**-0.5)
        nn.init.normal_(self.text_projection.weight, std=c.text_width**-0.5)

    @property
    def preprocess(self) -> Preprocess:
        return self.config.preprocess

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)
        self.decoder.grad_checkpointing = enable

    def scale(self) -> Tensor:
        """The similarity multiplier: ``exp(logit_scale)`` clamped to ``max_logit_scale``."""
        return self.logit_scale.exp().clamp(max=self.config.max_logit_scale)

    # ----------------------------------------------------------------- towers
    def image_features(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``[batch, 3, H, W]`` -> the projected contrastive feature ``[batch, embed_dim]`` (not normalised) and
        the decoder's context ``[batch, queries, embed_dim]``."""
        tokens = self.visual.ln_post(self.visual.forward_features(images))  # [batch, 1 + patches, vision_width]
        pooled = self.attn_pool(tokens)  # [batch, num_queries, embed_dim]
        if self.attn_pool_contrastive is None:
            latent, context = pooled[:, 0], pooled[:, 1:]
        else:
            latent, context = self.attn_pool_contrastive(tokens)[:, 0], pooled
        return self.visual_projection(latent), context

    def encode_image(self, images: Tensor, normalize: bool = True) -> Tensor:
        """``[batch, 3, H, W]`` -> ``[batch, embed_dim]``."""
        x = self.image_features(images)[0]
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None, normalize: bool = True) -> Tensor:
        """``[batch, length]`` token ids -> ``[batch, embed_dim]`` (the [CLS] token's feature, projected)."""
        x = self.text_projection(self.text(input_ids, attention_mask))
        return F.normalize(x, dim=-1) if normalize else x

    def towers(self) -> dict[str, nn.Module]:
        """The image and text towers (with their poolers and projections), for locking (LiT)."""
        image = [self.visual, self.attn_pool, self.visual_projection]
        if self.attn_pool_contrastive is not None:
            image.insert(2, self.attn_pool_contrastive)
        return {"image": nn.ModuleList(image), "text": nn.ModuleList([self.text, self.text_projection])}

    def tower_blocks(self, tower: str) -> nn.ModuleList:
        return self.visual.blocks if tower == "image" else self.text.blocks

    # ----------------------------------------------------------------- heads
    def forward(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None,
                head: str = "contrastive") -> TwoTowerOutput | CoCaOutput | Tensor:
        """One entry point for every use, so that wrappers acting on ``forward`` (DDP, FSDP) see each of them.

        Args:
            images: ``[batch, 3, H, W]``.
            input_ids: ``[batch, length]``, starting with ``bos_token_id``.
            attention_mask: ``[batch, length]`` 1 on tokens (None: tokens other than ``pad_token_id``).
            head: ``contrastive``: :class:`TwoTowerOutput`; ``caption``: logits ``[batch, length, vocab]``
                (:meth:`caption_logits`); ``coca``: :class:`CoCaOutput`, both from one pass.

        Raises:
            VlkitError: an unknown head.
        """
        if head == "contrastive":
            return TwoTowerOutput(self.encode_image(images), self.encode_text(input_ids, attention_mask), self.scale())
        if head == "caption":
            return self.caption_logits(images, input_ids, attention_mask)
        if head == "coca":
            image_latent, context = self.image_features(images)
            text_cls, tokens = self.text.forward_with_cls(input_ids, attention_mask)
            logits = self.decoder(tokens, context)
            return CoCaOutput(F.normalize(image_latent, dim=-1), F.normalize(self.text_projection(text_cls), dim=-1),
                              self.scale(), logits)
        raise VlkitError(f"unknown CoCa head {head!r}; choose contrastive, caption or coca")

    # ----------------------------------------------------------------- decoding interface
    @property
    def generation(self) -> GenerationSpec:
        c = self.config
        return GenerationSpec(c.bos_token_id, c.eos_token_id, c.pad_token_id, c.context_length, c.vocab_size)

    def caption_logits(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Teacher forcing: ``[batch, length, vocab]`` logits, position ``t`` predicting token ``t + 1``.
        Attention is causal, so padding after a caption changes nothing before it (``attention_mask`` is
        accepted for the common interface); the [CLS] token is not needed here."""
        context = self.image_features(images)[1]
        return self.decoder(self.text.forward_tokens(input_ids), context)

    def start_decoding(self, images: Tensor, max_length: int) -> DecoderCache:
        """Encode and pool ``images`` once; the cache holds every decoder layer's cross-attention keys/values and
        empty self-attention caches (text layers, then decoder layers) for ``max_length`` tokens.

        Raises:
            VlkitError: ``max_length`` beyond the context length.
        """
        c = self.config
        if max_length > c.context_length:
            raise VlkitError(f"max_length {max_length} exceeds the context length {c.context_length}")
        context = self.image_features(images)[1]  # [batch, queries, embed_dim]
        batch, device, dtype = context.shape[0], context.device, context.dtype
        text = DecoderCache.new_self_kv(c.text_layers, batch, c.text_heads, max_length, c.text_width // c.text_heads,
                                        device, dtype)
        dec = DecoderCache.new_self_kv(c.decoder_layers, batch, c.decoder_heads, max_length,
                                       c.decoder_width // c.decoder_heads, device, dtype)
        return DecoderCache(self_kv=text + dec, cross_kv=self.decoder.context_kv(context))

    def decode_step(self, input_ids: Tensor, cache: DecoderCache) -> Tensor:
        """Next-token logits ``[batch, new, vocab]`` of ``input_ids`` ``[batch, new]``, the tokens after those
        ``cache`` holds (whose keys/values are appended to it)."""
        n = self.config.text_layers
        x = self.text.step(input_ids, cache.self_kv[:n])  # [batch, new, text_width]
        return self.decoder(x, cross_kv=cache.cross_kv, kv_caches=cache.self_kv[n:], context_mask=cache.context_mask)

    # ----------------------------------------------------------------- weights
    def load_pretrained(self, path: str | Path) -> None:
        """Load weights from a vlkit model directory or weights file, or an open_clip CoCa checkpoint
        (``.pt``/``.bin``/``.safetensors``); see :func:`vlkit.models.coca.convert.load_coca_weights`."""
        from vlkit.models.coca.convert import load_coca_weights

        load_coca_weights(self, path)
