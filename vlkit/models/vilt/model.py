"""ViLT (Kim et al. 2021, "Vision-and-Language Transformer Without Convolution or Region Supervision"): one
transformer over the concatenation of text tokens and linearly embedded image patches, each with position and
modality embeddings, pooled at the first ([CLS]) token; pretrained with image-text matching and masked
language modelling."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from vlkit.errors import VlkitError
from vlkit.models.preprocess import Preprocess
from vlkit.modules.fusion.itm import ITMHead, itm_loss, random_negatives
from vlkit.modules.fusion.mlm import IGNORE_INDEX, MLMHead, mask_tokens, mlm_loss
from vlkit.modules.fusion.text_encoder import TextEmbeddings
from vlkit.modules.heads.ocr_pointer import OCRPointer
from vlkit.modules.layers.mlp import MLP
from vlkit.modules.layers.patch_embed import PatchEmbed
from vlkit.modules.layers.pos_embed import resample_grid
from vlkit.modules.layers.transformer import Transformer, TransformerEncoderLayer


def _default_preprocess() -> Preprocess:
    return Preprocess(image_size=384, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), context_length=40, tokenizer=None)


@dataclass
class ViLTConfig:
    """Sizes, token ids and training switches of a :class:`ViLT`.

    Attributes:
        vocab_size: number of token ids (30522 for the BERT vocabulary).
        mask_token_id: id of the MLM mask token.
        pad_token_id: id of padding (used when no attention mask is given).
        special_token_ids: ids never masked for MLM.
        context_length: most text tokens.
        image_size, patch_size: input and patch sides (other image sizes resample the position grid).
        width, layers, heads: the transformer.
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
    image_size: int = 384
    patch_size: int = 32
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    act: str = "gelu"
    norm_eps: float = 1e-6
    dropout: float = 0.0
    mlm_prob: float = 0.15
    tie_word_embeddings: bool = True
    answers: list[str] = field(default_factory=list)
    ocr_pointer: bool = False
    preprocess: Preprocess = field(default_factory=_default_preprocess)


@dataclass
class ViLTOutput:
    """The pretraining losses of a batch.

    Attributes:
        loss: ``itm + mlm``.
        itm: image-text matching loss over the batch's pairs and one drawn (other-group) text per image.
        mlm: masked language modelling loss on the matched pairs.
        itm_accuracy: ITM accuracy (no gradient).
        mlm_accuracy: accuracy of the masked-token predictions (no gradient).
    """

    loss: Tensor
    itm: Tensor
    mlm: Tensor
    itm_accuracy: Tensor
    mlm_accuracy: Tensor


class ViLT(nn.Module):
    """A single-stream transformer over ``[text tokens; image patches]`` with ITM, MLM and optional VQA heads.

    There are no separate towers, hence no ``encode_image`` / ``encode_text``: retrieval with ViLT scores
    every pair with :meth:`itm_scores`.

    Args:
        config: sizes and switches.
    """

    architecture = "vilt"
    config_class = ViLTConfig
    #: the transformer starts (in the paper) from a ViT, so it learns at the image rate; heads at the head rate
    LR_GROUPS = {"image": ("patch_embed.", "image_pos_embed", "transformer.", "norm."), "text": ("text_embed.",)}

    def __init__(self, config: ViLTConfig):
        super().__init__()
        c = self.config = config
        if c.preprocess.context_length > c.context_length:
            raise VlkitError(f"preprocess.context_length {c.preprocess.context_length} exceeds the model's "
                             f"context_length {c.context_length}")
        self.text_embed = TextEmbeddings(c.vocab_size, c.width, c.context_length)
        self.patch_embed = PatchEmbed(c.patch_size, c.width, bias=True)
        self.grid = (c.image_size // c.patch_size,) * 2
        self.image_pos_embed = nn.Parameter(torch.randn(self.grid[0] * self.grid[1], c.width) * 0.02)
        self.modality_embed = nn.Parameter(torch.randn(2, c.width) * 0.02)  # 0: text, 1: image
        self.transformer = Transformer([TransformerEncoderLayer(c.width, c.heads, c.mlp_ratio, c.act, c.norm_eps,
                                                                c.dropout) for _ in range(c.layers)])
        self.norm = nn.LayerNorm(c.width, eps=c.norm_eps)
        self.pooler = nn.Sequential(nn.Linear(c.width, c.width), nn.Tanh())
        self.itm_head = ITMHead(c.width)
        self.mlm_head = MLMHead(c.width, c.vocab_size, c.act, c.norm_eps, tied=c.tie_word_embeddings)
        self.answer_head = MLP(c.width, 2 * c.width, c.act, out_dim=len(c.answers)) if c.answers else None
        self.ocr_pointer = OCRPointer(c.width) if c.answers and c.ocr_pointer else None

    @property
    def preprocess(self) -> Preprocess:
        return self.config.preprocess

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def _mask(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        if attention_mask is None:
            return (input_ids != self.config.pad_token_id).long()
        return attention_mask

    # ----------------------------------------------------------------- the single stream
    def embed_image(self, images: Tensor) -> Tensor:
        """``[batch, 3, H, W]`` -> patch tokens with position and modality embeddings ``[batch, N, width]``."""
        x = self.patch_embed(images)  # [batch, N, width]
        grid = self.patch_embed.grid(images.shape[-2], images.shape[-1])
        pos = resample_grid(self.image_pos_embed, self.grid, grid, num_prefix=0)
        return x + (pos + self.modality_embed[1]).to(x.dtype)

    def _encode(self, input_ids: Tensor, attention_mask: Tensor, image_embeds: Tensor) -> Tensor:
        text = self.text_embed(input_ids) + self.modality_embed[0]  # [batch, L, width]
        x = torch.cat([text, image_embeds.to(text.dtype)], dim=1)  # [batch, L + N, width]
        image_mask = torch.ones(image_embeds.shape[:2], dtype=attention_mask.dtype, device=attention_mask.device)
        return self.norm(self.transformer(x, key_padding_mask=torch.cat([attention_mask, image_mask], dim=1)))

    def fuse(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """All output tokens, text first: ``[batch, L + N, width]``."""
        return self._encode(input_ids, self._mask(input_ids, attention_mask), self.embed_image(images))

    def fused_cls(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """The pooled first ([CLS]) token, ``[batch, width]``."""
        return self.pooler(self.fuse(images, input_ids, attention_mask)[:, 0])

    def itm_scores(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Probability that each image matches its text, ``[batch]``."""
        return self.itm_head(self.fused_cls(images, input_ids, attention_mask)).softmax(dim=-1)[:, 1]

    # ----------------------------------------------------------------- matching (vlkit.inference.matching)
    def match_features(self, images: Tensor) -> Tensor:
        """The image side of matching, computed once per image: :meth:`embed_image` (patch tokens with position
        and modality embeddings), ``[batch, N, width]``; the transformer itself runs per pair."""
        return self.embed_image(images)

    def match_scores(self, features: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Probability ``[batch]`` that the image of ``features`` row ``i`` (from :meth:`match_features`) matches
        text ``i``: the transformer over ``[text; image]``; equal to :meth:`itm_scores` on the images."""
        return self.match_logits(features, input_ids, attention_mask).softmax(dim=-1)[:, 1]

    def match_logits(self, features: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """The ITM head's logits ``[batch, 2]`` (not matched, matched) of the pairs :meth:`match_scores` scores."""
        tokens = self._encode(input_ids, self._mask(input_ids, attention_mask), features)  # [batch, L + N, width]
        return self.itm_head(self.pooler(tokens[:, 0]))

    def answer_logits(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None,
                      ocr_positions: Tensor | None = None) -> Tensor:
        """VQA logits over ``config.answers``, ``[batch, answers]``, followed by the pointer's ``K`` OCR-token
        scores, ``[batch, answers + K]``, when ``ocr_positions`` ``[batch, K]`` (where each OCR token starts in
        ``input_ids``, -1 for none) is given to a model with ``ocr_pointer``.

        Raises:
            VlkitError: the model has no answer head (``config.answers`` is empty).
        """
        if self.answer_head is None:
            raise VlkitError("this ViLT has no answer head: set config.answers")
        tokens = self.fuse(images, input_ids, attention_mask)  # [batch, L + N, width]
        pooled = self.pooler(tokens[:, 0])  # [batch, width]
        logits = self.answer_head(pooled)  # [batch, answers]
        if ocr_positions is None or self.ocr_pointer is None:
            return logits
        text = tokens[:, : input_ids.shape[1]]  # [batch, L, width]
        return torch.cat([logits, self.ocr_pointer(pooled, text, ocr_positions).to(logits.dtype)], dim=-1)

    def forward(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None,
                head: str = "pretrain", **kwargs: Any) -> ViLTOutput | Tensor:
        """One entry point for every use, so that wrappers that act on ``forward`` (DDP, FSDP) see each of them.

        Args:
            head: ``pretrain``: :meth:`pretrain_losses` (``kwargs`` are passed on); ``itm``: :meth:`itm_scores`;
                ``answer``: :meth:`answer_logits`; ``cls``: :meth:`fused_cls`.

        Raises:
            VlkitError: an unknown head.
        """
        if head == "pretrain":
            return self.pretrain_losses(images, input_ids, attention_mask, **kwargs)
        if head == "itm":
            return self.itm_scores(images, input_ids, attention_mask)
        if head == "answer":
            return self.answer_logits(images, input_ids, attention_mask, **kwargs)
        if head == "cls":
            return self.fused_cls(images, input_ids, attention_mask)
        raise VlkitError(f"unknown ViLT head {head!r}; choose pretrain, itm, answer or cls")

    # ----------------------------------------------------------------- pretraining
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
    ) -> ViLTOutput:
        """ITM + MLM on a batch of image-text pairs.

        Each image is also paired with a text drawn uniformly from the other groups of the batch (a negative);
        MLM runs on the matched pairs with masked text. The three sets go through the transformer as one batch.

        Args:
            images: ``[batch, 3, H, W]``.
            input_ids: ``[batch, L]``; row ``i`` describes image ``i``.
            attention_mask: ``[batch, L]`` (None: derived from ``pad_token_id``).
            group_ids: ``[batch]``: texts of the image's own group are never its negatives.
            mask_token_id: overrides ``config.mask_token_id``.
            generator: random generator for the negatives and the masking.
            word_ids: word of each token for whole-word masking (None: each token is a word).

        Returns:
            :class:`ViLTOutput`.
        """
        c = self.config
        mask = self._mask(input_ids, attention_mask)
        batch, length = input_ids.shape
        image_embeds = self.embed_image(images)  # [batch, N, width]
        neg = random_negatives(batch, group_ids, generator, input_ids.device)  # [batch]
        masked = mask_tokens(input_ids, mask, word_ids, c.mask_token_id if mask_token_id is None else mask_token_id,
                             c.vocab_size, c.mlm_prob, generator, c.special_token_ids)
        tokens = self._encode(torch.cat([input_ids, input_ids[neg], masked.input_ids]),
                              torch.cat([mask, mask[neg], mask]),
                              image_embeds.repeat(3, 1, 1))  # [3 * batch, L + N, width]
        cls = self.itm_head(self.pooler(tokens[: 2 * batch, 0]))  # [2 * batch, 2]
        itm = itm_loss(cls[:batch], cls[batch:])
        predicted = masked.labels != IGNORE_INDEX  # [batch, L]
        weight = self.text_embed.word_embed.weight if c.tie_word_embeddings else None
        logits = self.mlm_head(tokens[2 * batch:, :length][predicted], weight)  # [M, vocab]
        mlm = mlm_loss(logits, masked.labels[predicted])
        return ViLTOutput(loss=itm.loss + mlm.loss, itm=itm.loss, mlm=mlm.loss, itm_accuracy=itm.accuracy,
                          mlm_accuracy=mlm.accuracy)
