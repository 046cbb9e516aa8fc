"""BLIP (Li et al. 2022, "BLIP: Bootstrapping Language-Image Pre-training"): a ViT and one text transformer
that serves three modes with shared weights (:mod:`vlkit.modules.fusion.multimode_text`): a unimodal text encoder
aligned with the image by a contrastive loss (ITC, with momentum encoders, queues and distillation as ALBEF), an
image-grounded encoder trained to tell matched pairs from hard negatives (ITM), and an image-grounded causal
decoder trained to write the caption (LM)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlkit.errors import VlkitError
from vlkit.inference.interface import GenerationSpec
from vlkit.models.outputs import TwoTowerOutput
from vlkit.models.preprocess import CLIP_MEAN, CLIP_STD, Preprocess
from vlkit.modules.encoders.vit import VisionConfig, VisionTransformer
from vlkit.modules.fusion.distill import momentum_itc_loss
from vlkit.modules.fusion.itm import ITMHead, hard_negatives, itm_loss
from vlkit.modules.fusion.mlm import MLMHead
from vlkit.modules.fusion.multimode_text import MultimodeTextTransformer
from vlkit.modules.layers.decoder_cache import DecoderCache
from vlkit.modules.layers.mlp import MLP
from vlkit.modules.losses.captioning import caption_labels, caption_loss
from vlkit.modules.losses.contrastive import LearnableLogitScale, contrastive_loss
from vlkit.modules.losses.momentum import FeatureQueue, make_momentum_copy, momentum_update

#: the parts that have momentum (EMA) copies
MOMENTUM_PARTS = ("visual", "vision_proj", "text", "text_proj")
HEADS = ("contrastive", "pretrain", "itm", "caption", "answer", "cls")


def _default_preprocess() -> Preprocess:
    return Preprocess(image_size=224, mean=CLIP_MEAN, std=CLIP_STD, context_length=40, tokenizer=None)


@dataclass
class BLIPConfig:
    """Sizes, token ids and training switches of a :class:`BLIP` (defaults: BLIP-base, ViT-B/16).

    Attributes:
        vocab_size: number of token ids (30522 for the BERT vocabulary).
        pad_token_id, bos_token_id, eos_token_id: padding, start ([CLS]) and end ([SEP]) tokens.
        context_length: most text tokens (the start and end tokens included).
        image_size, patch_size, vision_width, vision_layers, vision_heads: the ViT.
        text_width, text_layers, text_heads: the text transformer (all three modes).
        embed_dim: width of the contrastive (ITC) embeddings.
        queue_size: momentum features kept per modality as extra contrastive negatives.
        momentum: EMA coefficient of the momentum encoders; 0 disables them, the queues and distillation.
        distill_alpha: weight of the momentum teacher's soft targets in ITC (needs ``momentum > 0``).
        label_smoothing: of the captioning (LM) loss (0.1 in the paper).
        answers: the answer vocabulary of a VQA classifier head on the fused [ENC] feature (empty: none).
    """

    vocab_size: int = 30522
    pad_token_id: int = 0
    bos_token_id: int = 101
    eos_token_id: int = 102
    context_length: int = 40
    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    text_width: int = 768
    text_layers: int = 12
    text_heads: int = 12
    mlp_ratio: float = 4.0
    act: str = "gelu"
    norm_eps: float = 1e-6
    embed_dim: int = 256
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0
    queue_size: int = 57600
    momentum: float = 0.995
    distill_alpha: float = 0.4
    label_smoothing: float = 0.1
    answers: list[str] = field(default_factory=list)
    preprocess: Preprocess = field(default_factory=_default_preprocess)


@dataclass
class BLIPOutput:
    """The pretraining losses of a batch.

    Attributes:
        loss: ``itc + itm + lm``.
        itc: image-text contrastive loss (with queues and distillation when momentum is on).
        itm: image-text matching loss over the batch's pairs and its mined hard negatives.
        lm: next-token cross-entropy of the image-grounded decoder (label-smoothed).
        itm_accuracy: ITM accuracy over positives and negatives (no gradient).
        lm_accuracy: share of caption tokens the decoder predicts right (no gradient).
    """

    loss: Tensor
    itc: Tensor
    itm: Tensor
    lm: Tensor
    itm_accuracy: Tensor
    lm_accuracy: Tensor


class BLIP(nn.Module):
    """Image encoder, the three-mode text transformer, and the ITC / ITM / LM (and optional VQA) heads.

    Implements the decoding interface (:mod:`vlkit.inference.interface`) and the matching interface
    (:mod:`vlkit.inference.matching`).

    Args:
        config: sizes and switches.

    Example:
        >>> model = vlkit.create_model("blip-tiny")
        >>> out = model.pretrain_losses(images, input_ids, attention_mask)   # BLIPOutput
        >>> out.loss.backward(); optimizer.step(); model.momentum_step()
        >>> model.itm_scores(images, input_ids, attention_mask)              # [batch] match probabilities
        >>> generate(model, images, num_beams=3).texts(tokenizer)            # captions
    """

    architecture = "blip"
    config_class = BLIPConfig
    #: parameter-name prefixes per learning-rate group (projections and heads take the head rate)
    LR_GROUPS = {"image": ("visual.",), "text": ("text.",)}

    def __init__(self, config: BLIPConfig):
        super().__init__()
        c = self.config = config
        if c.preprocess.context_length > c.context_length:
            raise VlkitError(f"preprocess.context_length {c.preprocess.context_length} exceeds the model's "
                             f"context_length {c.context_length}")
        self.visual = VisionTransformer(VisionConfig(
            image_size=c.image_size, patch_size=c.patch_size, width=c.vision_width, layers=c.vision_layers,
            heads=c.vision_heads, mlp_ratio=c.mlp_ratio, act=c.act, norm_eps=c.norm_eps))
        self.text = MultimodeTextTransformer(c.vocab_size, c.text_width, c.text_layers, c.text_heads,
                                             c.context_length, c.vision_width, c.mlp_ratio, c.act, c.norm_eps)
        self.vision_proj = nn.Linear(c.vision_width, c.embed_dim)
        self.text_proj = nn.Linear(c.text_width, c.embed_dim)
        self.temperature = LearnableLogitScale(c.init_temperature, c.max_logit_scale)
        self.itm_head = ITMHead(c.text_width)
        self.lm_head = MLMHead(c.text_width, c.vocab_size, c.act, c.norm_eps, tied=True)
        self.answer_head = MLP(c.text_width, 2 * c.text_width, c.act, out_dim=len(c.answers)) if c.answers else None
        self.momentum_encoders: nn.ModuleDict | None = None
        if c.momentum > 0:
            self.momentum_encoders = nn.ModuleDict({name: make_momentum_copy(getattr(self, name))
                                                    for name in MOMENTUM_PARTS})
            self.image_queue = FeatureQueue(c.embed_dim, c.queue_size)
            self.text_queue = FeatureQueue(c.embed_dim, c.queue_size)

    @property
    def preprocess(self) -> Preprocess:
        return self.config.preprocess

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)

    def scale(self) -> Tensor:
        """The contrastive similarity multiplier ``1 / temperature`` (clamped)."""
        return self.temperature.scale()

    def _mask(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        if attention_mask is None:
            return (input_ids != self.config.pad_token_id).long()
        return attention_mask

    # ----------------------------------------------------------------- unimodal
    @staticmethod
    def _image_tokens(visual: VisionTransformer, images: Tensor) -> Tensor:
        return visual.ln_post(visual.forward_features(images))  # [batch, 1 + patches, vision_width]

    def image_tokens(self, images: Tensor) -> Tensor:
        """``[batch, 3, H, W]`` -> normalised tokens ``[batch, 1 + patches, vision_width]`` (class token first)."""
        return self._image_tokens(self.visual, images)

    def encode_image(self, images: Tensor, normalize: bool = True) -> Tensor:
        """``[batch, 3, H, W]`` -> ITC embeddings ``[batch, embed_dim]``."""
        x = self.vision_proj(self.visual(images))  # the class token, last block computed for it only
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None, normalize: bool = True) -> Tensor:
        """``[batch, length]`` token ids -> ITC embeddings ``[batch, embed_dim]`` (the unimodal [CLS])."""
        x = self.text_proj(self.text(input_ids, self._mask(input_ids, attention_mask))[:, 0])
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None,
                head: str = "contrastive", **kwargs: Any) -> TwoTowerOutput | BLIPOutput | Tensor:
        """One entry point for every use, so that wrappers that act on ``forward`` (DDP, FSDP) see each of them.

        Args:
            head: ``contrastive``: the ITC embeddings as a :class:`TwoTowerOutput`; ``pretrain``:
                :meth:`pretrain_losses` (``kwargs`` passed on); ``itm``: :meth:`itm_scores`; ``caption``:
                :meth:`caption_logits`; ``answer``: :meth:`answer_logits`; ``cls``: the fused [ENC] feature
                ``[batch, text_width]``.

        Raises:
            VlkitError: an unknown head.
        """
        if head == "contrastive":
            return TwoTowerOutput(self.encode_image(images), self.encode_text(input_ids, attention_mask),
                                  self.scale())
        if head == "pretrain":
            return self.pretrain_losses(images, input_ids, attention_mask, **kwargs)
        if head == "itm":
            return self.itm_scores(images, input_ids, attention_mask)
        if head == "caption":
            return self.caption_logits(images, input_ids, attention_mask)
        if head == "answer":
            return self.answer_logits(images, input_ids, attention_mask)
        if head == "cls":
            return self._fused_cls(images, input_ids, attention_mask)
        raise VlkitError(f"unknown BLIP head {head!r}; choose one of {', '.join(HEADS)}")

    # ----------------------------------------------------------------- image-grounded encoder (matching)
    def fuse(self, image_tokens: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """The image-grounded encoder: ``image_tokens`` [batch, N, vision_width] (from :meth:`image_tokens`) and
        ``input_ids`` [batch, L] -> ``[batch, L, text_width]``, the [ENC] marker first."""
        return self.text(input_ids, self._mask(input_ids, attention_mask), "encoder", image_tokens)

    def _fused_cls(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        return self.fuse(self.image_tokens(images), input_ids, attention_mask)[:, 0]  # [batch, text_width]

    def match_features(self, images: Tensor) -> Tensor:
        """The image side of matching: normalised image tokens ``[batch, 1 + patches, vision_width]``."""
        return self.image_tokens(images)

    def match_scores(self, features: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Probability ``[batch]`` that the image of ``features`` row ``i`` matches text ``i``."""
        return self.itm_head(self.fuse(features, input_ids, attention_mask)[:, 0]).softmax(dim=-1)[:, 1]

    def itm_scores(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Probability that each image matches its text, ``[batch]``."""
        return self.match_scores(self.image_tokens(images), input_ids, attention_mask)

    def answer_logits(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """VQA logits over ``config.answers``, ``[batch, answers]`` (questions as ``input_ids``).

        Raises:
            VlkitError: the model has no answer head (``config.answers`` is empty).
        """
        if self.answer_head is None:
            raise VlkitError("this BLIP has no answer head: set config.answers (or let it write answers)")
        return self.answer_head(self._fused_cls(images, input_ids, attention_mask))

    # ----------------------------------------------------------------- image-grounded decoder (captions)
    def _lm_logits(self, hidden: Tensor) -> Tensor:
        return self.lm_head(hidden, self.text.word_embeddings.weight)  # [batch, length, vocab]

    @property
    def generation(self) -> GenerationSpec:
        c = self.config
        return GenerationSpec(c.bos_token_id, c.eos_token_id, c.pad_token_id, c.context_length, c.vocab_size)

    def caption_logits(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Teacher forcing: ``[batch, length, vocab]``, position ``t`` predicting token ``t + 1`` (the first
        token is read as the [DEC] marker). The decoder is causal, so padding after a caption changes nothing
        before it (``attention_mask`` is accepted for the common interface)."""
        return self._lm_logits(self.text(input_ids, mode="decoder", context=self.image_tokens(images)))

    def start_decoding(self, images: Tensor, max_length: int) -> DecoderCache:
        """Encode ``images`` once; the cache holds every layer's cross-attention keys/values over their tokens
        and empty causal self-attention caches for ``max_length`` tokens.

        Raises:
            VlkitError: ``max_length`` beyond the context length.
        """
        if max_length > self.config.context_length:
            raise VlkitError(f"max_length {max_length} exceeds the context length {self.config.context_length}")
        return self.text.start(self.image_tokens(images), max_length)

    def decode_step(self, input_ids: Tensor, cache: DecoderCache) -> Tensor:
        """Logits ``[batch, new, vocab]`` of the tokens ``[batch, new]`` after those ``cache`` holds."""
        return self._lm_logits(self.text.step(input_ids, cache))

    # ----------------------------------------------------------------- pretraining
    def pretrain_losses(
        self,
        images: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        group_ids: Tensor | None = None,
        generator: torch.Generator | None = None,
        *,
        alpha: float | None = None,
    ) -> BLIPOutput:
        """ITC + ITM + LM on a batch of image-text pairs (BLIP's pretraining objective).

        With momentum on, the batch's momentum features are enqueued at the end (call :meth:`momentum_step`
        after each optimizer step).

        Args:
            images: ``[batch, 3, H, W]``.
            input_ids: ``[batch, L]`` ``[CLS] caption [SEP]``; row ``i`` describes image ``i``.
            attention_mask: ``[batch, L]`` (None: derived from ``pad_token_id``).
            group_ids: ``[batch]``: pairs of one group (e.g. one image) are all positives of each other in ITC
                and never drawn as ITM negatives of each other.
            generator: random generator for the hard negatives.
            alpha: overrides ``config.distill_alpha`` (e.g. BLIP's warm-up over the first epoch).

        Returns:
            :class:`BLIPOutput`.
        """
        c = self.config
        alpha = c.distill_alpha if alpha is None else alpha
        mask = self._mask(input_ids, attention_mask)
        batch = input_ids.shape[0]
        img = self.image_tokens(images)  # [batch, 1 + N, vision_width]
        txt = self.text(input_ids, mask)  # [batch, L, text_width], unimodal
        image_feat = F.normalize(self.vision_proj(img[:, 0]), dim=-1)  # [batch, embed_dim]
        text_feat = F.normalize(self.text_proj(txt[:, 0]), dim=-1)
        scale = self.scale()
        m = self.momentum_encoders
        if m is not None:
            with torch.no_grad():
                image_feat_m = F.normalize(m["vision_proj"](self._image_tokens(m["visual"], images)[:, 0]), dim=-1)
                text_feat_m = F.normalize(m["text_proj"](m["text"](input_ids, mask)[:, 0]), dim=-1)
            itc = momentum_itc_loss(image_feat, text_feat, image_feat_m, text_feat_m, self.image_queue.features_view(),
                                    self.text_queue.features_view(), scale, alpha, group_ids)
            sim_i2t, sim_t2i = itc.logits_per_image[:, :batch], itc.logits_per_text[:, :batch]
        else:
            itc = contrastive_loss(image_feat, text_feat, scale, group_ids)
            sim_i2t, sim_t2i = itc.logits_per_image, itc.logits_per_image.T

        # ITM: the image-grounded encoder over [positives; image + hard negative text; hard negative image + text]
        neg = hard_negatives(sim_i2t, sim_t2i, group_ids, generator)
        fused = self.text(torch.cat([input_ids, input_ids[neg.text_index], input_ids]),
                          torch.cat([mask, mask[neg.text_index], mask]), "encoder",
                          torch.cat([img, img, img[neg.image_index]]))  # [3 * batch, L, text_width]
        cls = self.itm_head(fused[:, 0])  # [3 * batch, 2]
        itm = itm_loss(cls[:batch], cls[batch:])
        # LM: the image-grounded decoder writes each caption after its [DEC] marker
        logits = self._lm_logits(self.text(input_ids, mode="decoder", context=img))  # [batch, L, vocab]
        lm = caption_loss(logits, caption_labels(input_ids, mask), c.label_smoothing)
        if m is not None:
            self.image_queue.enqueue(image_feat_m)
            self.text_queue.enqueue(text_feat_m)
        return BLIPOutput(loss=itc.loss + itm.loss + lm.loss, itc=itc.loss, itm=itm.loss, lm=lm.loss,
                          itm_accuracy=itm.accuracy, lm_accuracy=lm.accuracy)

    @torch.no_grad()
    def momentum_step(self) -> None:
        """Move the momentum encoders towards the online ones (call after each optimizer step)."""
        if self.momentum_encoders is None:
            return
        for name in MOMENTUM_PARTS:
            momentum_update(getattr(self, name), self.momentum_encoders[name], self.config.momentum)

    # ----------------------------------------------------------------- towers (LiT-style locking)
    def towers(self) -> dict[str, nn.Module]:
        return {"image": nn.ModuleList([self.visual, self.vision_proj]),
                "text": nn.ModuleList([self.text, self.text_proj])}

    def tower_blocks(self, tower: str) -> nn.ModuleList:
        return self.visual.blocks if tower == "image" else self.text.layers
