"""ALBEF (Li et al. 2021, "Align before Fuse"): a ViT image encoder and a bidirectional text encoder aligned by
a contrastive loss (with momentum encoders, feature queues and momentum distillation), then fused by
cross-attention layers trained with image-text matching on hard negatives and masked language modelling."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlkit.errors import VlkitError
from vlkit.models.outputs import TwoTowerOutput
from vlkit.models.preprocess import CLIP_MEAN, CLIP_STD, Preprocess
from vlkit.modules.encoders.vit import VisionConfig, VisionTransformer
from vlkit.modules.fusion.cross_attention import FusionEncoder
from vlkit.modules.fusion.distill import momentum_itc_loss
from vlkit.modules.fusion.itm import ITMHead, hard_negatives, itm_loss
from vlkit.modules.fusion.mlm import IGNORE_INDEX, MLMHead, mask_tokens, mlm_loss
from vlkit.modules.fusion.text_encoder import BidirectionalTextEncoder
from vlkit.modules.heads.ocr_pointer import OCRPointer
from vlkit.modules.layers.mlp import MLP
from vlkit.modules.losses.contrastive import LearnableLogitScale, contrastive_loss
from vlkit.modules.losses.momentum import FeatureQueue, make_momentum_copy, momentum_update

#: the parts that have momentum (EMA) copies
MOMENTUM_PARTS = ("visual", "vision_proj", "text_encoder", "text_proj", "fusion", "mlm_head")


def _default_preprocess() -> Preprocess:
    return Preprocess(image_size=256, mean=CLIP_MEAN, std=CLIP_STD, context_length=40, tokenizer=None)


@dataclass
class ALBEFConfig:
    """Sizes, token ids and training switches of an :class:`ALBEF`.

    Attributes:
        vocab_size: number of token ids (30522 for the BERT vocabulary).
        mask_token_id: id of the MLM mask token ([MASK] = 103 in BERT).
        pad_token_id: id of padding (used when no attention mask is given).
        special_token_ids: ids never masked for MLM ([PAD], [UNK], [CLS], [SEP], [MASK] in BERT).
        context_length: most text tokens.
        image_size, patch_size: the ViT input and patch sides.
        vision_width, vision_layers, vision_heads: the image encoder.
        text_width, text_heads: the text and fusion encoders (the fusion works at the text width).
        text_layers: bidirectional self-attention layers of the text encoder.
        fusion_layers: cross-attention layers of the fusion encoder.
        embed_dim: width of the contrastive (ITC) embeddings.
        queue_size: momentum features kept per modality as extra contrastive negatives.
        momentum: EMA coefficient of the momentum encoders; 0 disables them and the queues.
        distill_alpha: weight of the momentum teacher's soft targets in ITC and MLM (needs ``momentum > 0``).
        mlm_prob: probability of masking each word.
        answers: the answer vocabulary of a VQA classifier head (empty: no head).
        ocr_pointer: the answer head also scores OCR tokens given after the question (a copy pointer,
            :class:`~vlkit.modules.heads.ocr_pointer.OCRPointer`; needs ``answers``).
    """

    vocab_size: int = 30522
    mask_token_id: int = 103
    pad_token_id: int = 0
    special_token_ids: tuple[int, ...] = (0, 100, 101, 102, 103)
    context_length: int = 40
    image_size: int = 256
    patch_size: int = 16
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    text_width: int = 768
    text_layers: int = 6
    fusion_layers: int = 6
    text_heads: int = 12
    mlp_ratio: float = 4.0
    act: str = "gelu"
    norm_eps: float = 1e-6
    dropout: float = 0.0
    embed_dim: int = 256
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0
    queue_size: int = 65536
    momentum: float = 0.995
    distill_alpha: float = 0.4
    mlm_prob: float = 0.15
    tie_word_embeddings: bool = True
    answers: list[str] = field(default_factory=list)
    ocr_pointer: bool = False
    preprocess: Preprocess = field(default_factory=_default_preprocess)


@dataclass
class ALBEFOutput:
    """The pretraining losses of a batch.

    Attributes:
        loss: ``itc + itm + mlm``.
        itc: image-text contrastive loss (with queues and distillation when momentum is on).
        itm: image-text matching loss over the batch's pairs and its mined hard negatives.
        mlm: masked language modelling loss (distilled when momentum is on).
        itm_accuracy: ITM accuracy over positives and negatives (no gradient).
        mlm_accuracy: accuracy of the masked-token predictions (no gradient).
    """

    loss: Tensor
    itc: Tensor
    itm: Tensor
    mlm: Tensor
    itm_accuracy: Tensor
    mlm_accuracy: Tensor


class ALBEF(nn.Module):
    """Image encoder, text encoder, fusion encoder and the ITC / ITM / MLM (and optional VQA) heads.

    Args:
        config: sizes and switches.

    Example:
        >>> model = vlkit.create_model("albef-tiny")
        >>> out = model.pretrain_losses(images, input_ids, attention_mask)   # ALBEFOutput
        >>> out.loss.backward(); optimizer.step(); model.momentum_step()
        >>> model.itm_scores(images, input_ids, attention_mask)              # [batch] match probabilities
    """

    architecture = "albef"
    config_class = ALBEFConfig
    #: parameter-name prefixes per learning-rate group (projections and heads take the head rate)
    LR_GROUPS = {"image": ("visual.",), "text": ("text_encoder.", "fusion.")}

    def __init__(self, config: ALBEFConfig):
        super().__init__()
        c = self.config = config
        if c.preprocess.context_length > c.context_length:
            raise VlkitError(f"preprocess.context_length {c.preprocess.context_length} exceeds the model's "
                             f"context_length {c.context_length}")
        self.visual = VisionTransformer(VisionConfig(
            image_size=c.image_size, patch_size=c.patch_size, width=c.vision_width, layers=c.vision_layers,
            heads=c.vision_heads, mlp_ratio=c.mlp_ratio, act=c.act, norm_eps=c.norm_eps))
        self.text_encoder = BidirectionalTextEncoder(c.vocab_size, c.text_width, c.text_layers, c.text_heads,
                                                     c.context_length, c.mlp_ratio, c.act, c.norm_eps, c.dropout)
        self.fusion = FusionEncoder.build(c.text_width, c.fusion_layers, c.text_heads, c.vision_width, c.mlp_ratio,
                                          c.act, c.norm_eps)
        self.vision_proj = nn.Linear(c.vision_width, c.embed_dim)
        self.text_proj = nn.Linear(c.text_width, c.embed_dim)
        self.temperature = LearnableLogitScale(c.init_temperature, c.max_logit_scale)
        self.itm_head = ITMHead(c.text_width)
        self.mlm_head = MLMHead(c.text_width, c.vocab_size, c.act, c.norm_eps, tied=c.tie_word_embeddings)
        self.answer_head = MLP(c.text_width, 2 * c.text_width, c.act, out_dim=len(c.answers)) if c.answers else None
        self.ocr_pointer = OCRPointer(c.text_width) if c.answers and c.ocr_pointer else None
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
        self.text_encoder.set_grad_checkpointing(enable)
        self.fusion.grad_checkpointing = enable

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

    def text_tokens(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """``[batch, length]`` -> unimodal text tokens ``[batch, length, text_width]`` ([CLS] first)."""
        return self.text_encoder(input_ids, self._mask(input_ids, attention_mask))

    def encode_image(self, images: Tensor, normalize: bool = True) -> Tensor:
        """``[batch, 3, H, W]`` -> ITC embeddings ``[batch, embed_dim]``."""
        x = self.vision_proj(self.visual(images))  # the class token, last block computed for it only
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None, normalize: bool = True) -> Tensor:
        """``[batch, length]`` token ids -> ITC embeddings ``[batch, embed_dim]``."""
        x = self.text_proj(self.text_tokens(input_ids, attention_mask)[:, 0])
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None,
                head: str = "contrastive", **kwargs: Any) -> TwoTowerOutput | ALBEFOutput | Tensor:
        """One entry point for every use, so that wrappers that act on ``forward`` (DDP, FSDP) see each of them.

        Args:
            head: ``contrastive``: the ITC embeddings of both towers as a :class:`TwoTowerOutput` (what
                two-tower training and retrieval read); ``pretrain``: :meth:`pretrain_losses` (``kwargs`` are
                passed on); ``itm``: :meth:`itm_scores`; ``answer``: :meth:`answer_logits`; ``cls``: the fused
                ``[CLS]`` feature ``[batch, text_width]`` (classification heads of tasks read it).

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
        if head == "answer":
            return self.answer_logits(images, input_ids, attention_mask, **kwargs)
        if head == "cls":
            return self._fused_cls(images, input_ids, attention_mask)
        raise VlkitError(f"unknown ALBEF head {head!r}; choose contrastive, pretrain, itm, answer or cls")

    # ----------------------------------------------------------------- fusion
    def fuse(self, image_tokens: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Text fused with image tokens: ``image_tokens`` [batch, N, vision_width] (from :meth:`image_tokens`)
        and ``input_ids`` [batch, L] -> ``[batch, L, text_width]``."""
        mask = self._mask(input_ids, attention_mask)
        return self.fusion(self.text_encoder(input_ids, mask), image_tokens, mask)

    def _fused_cls(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        return self.fuse(self.image_tokens(images), input_ids, attention_mask)[:, 0]  # [batch, text_width]

    def itm_scores(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Probability that each image matches its text, ``[batch]``."""
        return self.itm_head(self._fused_cls(images, input_ids, attention_mask)).softmax(dim=-1)[:, 1]

    # ----------------------------------------------------------------- matching (vlkit.inference.matching)
    def match_features(self, images: Tensor) -> Tensor:
        """The image side of matching, computed once per image: :meth:`image_tokens`,
        ``[batch, 1 + patches, vision_width]``."""
        return self.image_tokens(images)

    def match_scores(self, features: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Probability ``[batch]`` that the image of ``features`` row ``i`` (from :meth:`match_features`) matches
        text ``i``; equal to :meth:`itm_scores` on the images."""
        return self.match_logits(features, input_ids, attention_mask).softmax(dim=-1)[:, 1]

    def match_logits(self, features: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """The ITM head's logits ``[batch, 2]`` (not matched, matched) of the pairs :meth:`match_scores` scores."""
        return self.itm_head(self.fuse(features, input_ids, attention_mask)[:, 0])  # fused [CLS]: [batch, text_width]

    def answer_logits(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None,
                      ocr_positions: Tensor | None = None) -> Tensor:
        """VQA logits over ``config.answers``, ``[batch, answers]`` (questions as ``input_ids``), followed by the
        pointer's ``K`` OCR-token scores, ``[batch, answers + K]``, when ``ocr_positions`` ``[batch, K]`` (where
        each OCR token starts in ``input_ids``, -1 for none) is given to a model with ``ocr_pointer``.

        Raises:
            VlkitError: the model has no answer head (``config.answers`` is empty).
        """
        if self.answer_head is None:
            raise VlkitError("this ALBEF has no answer head: set config.answers")
        fused = self.fuse(self.image_tokens(images), input_ids, attention_mask)  # [batch, L, text_width]
        logits = self.answer_head(fused[:, 0])  # [batch, answers]
        if ocr_positions is None or self.ocr_pointer is None:
            return logits
        return torch.cat([logits, self.ocr_pointer(fused[:, 0], fused, ocr_positions).to(logits.dtype)], dim=-1)

    # ----------------------------------------------------------------- pretraining
    def _word_weight(self, text_encoder: BidirectionalTextEncoder) -> Tensor | None:
        return text_encoder.word_embeddings.weight if self.config.tie_word_embeddings else None

    def pretrain_losses(
        self,
        images: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        group_ids: Tensor | None = None,
        mask_token_id: int | None = None,
        generator: torch.Generator | None = None,
        *,
        word_ids: Tensor | None = None,
        alpha: float | None = None,
    ) -> ALBEFOutput:
        """ITC + ITM + MLM on a batch of image-text pairs.

        With momentum on, the batch's momentum features are enqueued at the end (call :meth:`momentum_step`
        after each optimizer step).

        Args:
            images: ``[batch, 3, H, W]``.
            input_ids: ``[batch, L]``; row ``i`` describes image ``i``.
            attention_mask: ``[batch, L]`` (None: derived from ``pad_token_id``).
            group_ids: ``[batch]``: pairs of one group (e.g. one image) are all positives of each other in ITC
                and never drawn as ITM negatives of each other.
            mask_token_id: overrides ``config.mask_token_id``.
            generator: random generator for the hard negatives and the masking.
            word_ids: word of each token for whole-word masking (see :func:`vlkit.modules.fusion.mask_tokens`);
                None: each token is a word.
            alpha: overrides ``config.distill_alpha`` (e.g. ALBEF's warm-up over the first epoch).

        Returns:
            :class:`ALBEFOutput`.
        """
        c = self.config
        alpha = c.distill_alpha if alpha is None else alpha
        mask = self._mask(input_ids, attention_mask)
        batch = input_ids.shape[0]
        img = self.image_tokens(images)  # [batch, 1 + N, vision_width]
        txt = self.text_encoder(input_ids, mask)  # [batch, L, text_width]
        image_feat = F.normalize(self.vision_proj(img[:, 0]), dim=-1)  # [batch, embed_dim]
        text_feat = F.normalize(self.text_proj(txt[:, 0]), dim=-1)
        scale = self.scale()
        m = self.momentum_encoders
        if m is not None:
            with torch.no_grad():
                img_m = self._image_tokens(m["visual"], images)
                image_feat_m = F.normalize(m["vision_proj"](img_m[:, 0]), dim=-1)
                text_feat_m = F.normalize(m["text_proj"](m["text_encoder"](input_ids, mask)[:, 0]), dim=-1)
            itc = momentum_itc_loss(image_feat, text_feat, image_feat_m, text_feat_m, self.image_queue.features_view(),
                                    self.text_queue.features_view(), scale, alpha, group_ids)
            sim_i2t, sim_t2i = itc.logits_per_image[:, :batch], itc.logits_per_text[:, :batch]
        else:
            itc = contrastive_loss(image_feat, text_feat, scale, group_ids)
            sim_i2t, sim_t2i = itc.logits_per_image, itc.logits_per_image.T

        # ITM on the positives, a hard negative text per image and a hard negative image per text; MLM on the
        # positives with masked text. One fusion pass over [pos; image + neg text; neg image + text; masked].
        neg = hard_negatives(sim_i2t, sim_t2i, group_ids, generator)
        masked = mask_tokens(input_ids, mask, word_ids, c.mask_token_id if mask_token_id is None else mask_token_id,
                             c.vocab_size, c.mlm_prob, generator, c.special_token_ids)
        txt_masked = self.text_encoder(masked.input_ids, mask)
        fused = self.fusion(torch.cat([txt, txt[neg.text_index], txt, txt_masked]),
                            torch.cat([img, img, img[neg.image_index], img]),
                            torch.cat([mask, mask[neg.text_index], mask, mask]))  # [4 * batch, L, text_width]
        cls = self.itm_head(fused[: 3 * batch, 0])  # [3 * batch, 2]
        itm = itm_loss(cls[:batch], cls[batch:])
        predicted = masked.labels != IGNORE_INDEX  # [batch, L]
        logits = self.mlm_head(fused[3 * batch:][predicted], self._word_weight(self.text_encoder))  # [M, vocab]
        teacher = None
        if m is not None and alpha > 0:
            with torch.no_grad():
                fused_m = m["fusion"](m["text_encoder"](masked.input_ids, mask), img_m, mask)
                teacher = m["mlm_head"](fused_m[predicted], self._word_weight(m["text_encoder"]))
        mlm = mlm_loss(logits, masked.labels[predicted], teacher, alpha)
        if m is not None:
            self.image_queue.enqueue(image_feat_m)
            self.text_queue.enqueue(text_feat_m)
        return ALBEFOutput(loss=itc.loss + itm.loss + mlm.loss, itc=itc.loss, itm=itm.loss, mlm=mlm.loss,
                           itm_accuracy=itm.accuracy, mlm_accuracy=mlm.accuracy)

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
                "text": nn.ModuleList([self.text_encoder, self.text_proj])}

    def tower_blocks(self, tower: str) -> nn.ModuleList:
        return self.visual.blocks if tower == "image" else self.text_encoder.transformer.layers
