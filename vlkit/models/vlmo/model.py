"""VLMo (Bao et al. 2022, "VLMo: Unified Vision-Language Pre-Training with Mixture-of-Modality-Experts"): one
multiway transformer whose layers share self-attention and route each token to a feed-forward expert:
``vision`` for image patches, ``language`` for text tokens and ``vl`` for every token of the top
``fusion_layers`` layers of a fused image-text pass.

The same weights serve as a dual encoder (image-only and text-only passes, contrastive embeddings from the class
and [CLS] tokens: retrieval, indexing, search) and as a fusion encoder (text tokens followed by image tokens:
image-text matching, VQA, classification). Training is staged by ``config.stage`` (see
:mod:`vlkit.models.vlmo.pretrain`): ``image`` (masked image modelling), ``text`` (masked language modelling with
the self-attention and the vision expert frozen), ``image_text`` (ITC + ITM with hard negatives + MLM).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vlkit.errors import VlkitError
from vlkit.models.outputs import TwoTowerOutput
from vlkit.models.preprocess import Preprocess
from vlkit.models.vlmo.pretrain import STAGES, VLMoOutput, pretrain_losses
from vlkit.models.vlmo.weights import frozen_parameter_names, load_vlmo_weights
from vlkit.modules.fusion.itm import ITMHead
from vlkit.modules.fusion.mlm import MLMHead
from vlkit.modules.fusion.text_encoder import TextEmbeddings
from vlkit.modules.heads.ocr_pointer import OCRPointer
from vlkit.modules.layers.mlp import MLP
from vlkit.modules.layers.multiway import MultiwayEncoderLayer
from vlkit.modules.layers.patch_embed import PatchEmbed
from vlkit.modules.layers.pos_embed import resample_grid
from vlkit.modules.losses.contrastive import LearnableLogitScale

#: feed-forward experts of the top ``fusion_layers`` layers (the others have the first two), and the expert of
#: each modality outside a fused pass's top layers
EXPERTS = ("vision", "language", "vl")
MODALITY_EXPERT = {"image": "vision", "text": "language"}


def _default_preprocess() -> Preprocess:
    return Preprocess(image_size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), context_length=40, tokenizer=None)


@dataclass
class VLMoConfig:
    """Sizes, token ids and training switches of a :class:`VLMo`.

    Attributes:
        vocab_size: number of token ids (30522 for the BERT vocabulary).
        mask_token_id: id of the MLM mask token ([MASK] = 103 in BERT).
        pad_token_id: id of padding (used when no attention mask is given).
        special_token_ids: ids never masked for MLM.
        context_length: most text tokens.
        image_size, patch_size: input and patch sides (other image sizes resample the position grid).
        width, layers, heads: the multiway transformer.
        fusion_layers: top layers that use the ``vl`` expert for every token of a fused pass.
        embed_dim: width of the contrastive (ITC) embeddings.
        stage: what :meth:`VLMo.pretrain_losses` trains: ``image`` (MIM), ``text`` (MLM; self-attention and
            vision expert frozen) or ``image_text`` (ITC + ITM + MLM).
        mlm_prob: probability of masking each word.
        mim_ratio: fraction of the patches masked for masked image modelling.
        answers: the answer vocabulary of a VQA classifier head (empty: no head).
        ocr_pointer: the answer head also scores OCR tokens given after the question (a copy pointer,
            :class:`~vlkit.modules.heads.ocr_pointer.OCRPointer`; needs ``answers``).
    """

    vocab_size: int = 30522
    mask_token_id: int = 103
    pad_token_id: int = 0
    special_token_ids: tuple[int, ...] = (0, 100, 101, 102, 103)
    context_length: int = 40
    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    fusion_layers: int = 2
    mlp_ratio: float = 4.0
    act: str = "gelu"
    norm_eps: float = 1e-6
    dropout: float = 0.0
    embed_dim: int = 768
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0
    stage: str = "image_text"
    mlm_prob: float = 0.15
    mim_ratio: float = 0.4
    tie_word_embeddings: bool = True
    answers: list[str] = field(default_factory=list)
    ocr_pointer: bool = False
    preprocess: Preprocess = field(default_factory=_default_preprocess)


def _check(c: VLMoConfig) -> None:
    if c.stage not in STAGES:
        raise VlkitError(f"VLMo stage must be one of {', '.join(STAGES)}, got {c.stage!r}")
    if not 0 <= c.fusion_layers <= c.layers:
        raise VlkitError(f"fusion_layers {c.fusion_layers} must be between 0 and layers ({c.layers})")
    if c.preprocess.context_length > c.context_length:
        raise VlkitError(f"preprocess.context_length {c.preprocess.context_length} exceeds the model's "
                         f"context_length {c.context_length}")


class VLMo(nn.Module):
    """The multiway transformer with its contrastive, ITM, MLM, MIM and optional VQA heads.

    Args:
        config: sizes and switches.

    Example:
        >>> model = vlkit.create_model("vlmo-tiny", stage="image_text")
        >>> out = model.pretrain_losses(images, input_ids, attention_mask)  # VLMoOutput(loss, itc, itm, mlm, ...)
        >>> model.encode_image(images), model.encode_text(input_ids)        # dual encoder
        >>> model.itm_scores(images, input_ids, attention_mask)             # fusion encoder, [batch]
    """

    architecture = "vlmo"
    config_class = VLMoConfig
    #: the backbone learns at the image rate (initialised from an image model in the paper), text embeddings at
    #: the text rate, projections and heads at the head rate
    LR_GROUPS = {"image": ("patch_embed.", "cls_token", "image_pos_embed", "mask_embed", "image_type_embed",
                           "layers.", "norm."),
                 "text": ("text_embed.", "text_type_embed")}

    def __init__(self, config: VLMoConfig):
        super().__init__()
        self._build(config)

    def _build(self, config: VLMoConfig) -> None:
        """(Re)create every submodule for ``config`` (also used when loading weights of other sizes)."""
        _check(config)
        c = self.config = config
        self.grad_checkpointing = False
        self.text_embed = TextEmbeddings(c.vocab_size, c.width, c.context_length)
        self.patch_embed = PatchEmbed(c.patch_size, c.width, bias=True)
        self.grid = (c.image_size // c.patch_size,) * 2
        self.cls_token = nn.Parameter(torch.randn(c.width) * 0.02)
        self.image_pos_embed = nn.Parameter(torch.randn(1 + self.grid[0] * self.grid[1], c.width) * 0.02)
        self.mask_embed = nn.Parameter(torch.randn(c.width) * 0.02)  # replaces masked patches (MIM)
        self.text_type_embed = nn.Parameter(torch.randn(c.width) * 0.02)  # modality (type) embeddings
        self.image_type_embed = nn.Parameter(torch.randn(c.width) * 0.02)
        # the vl expert only where a fused pass uses it (the top layers), as in the paper (175M parameters at base)
        first_top = c.layers - c.fusion_layers
        self.layers = nn.ModuleList([MultiwayEncoderLayer(c.width, c.heads, EXPERTS if i >= first_top else EXPERTS[:2],
                                                          c.mlp_ratio, c.act, c.norm_eps, c.dropout)
                                     for i in range(c.layers)])
        self.norm = nn.LayerNorm(c.width, eps=c.norm_eps)
        self.vision_proj = nn.Linear(c.width, c.embed_dim)
        self.text_proj = nn.Linear(c.width, c.embed_dim)
        self.temperature = LearnableLogitScale(c.init_temperature, c.max_logit_scale)
        self.pooler = nn.Sequential(nn.Linear(c.width, c.width), nn.Tanh())
        self.itm_head = ITMHead(c.width)
        self.mlm_head = MLMHead(c.width, c.vocab_size, c.act, c.norm_eps, tied=c.tie_word_embeddings)
        self.mim_head = nn.Linear(c.width, 3 * c.patch_size ** 2)  # normalised pixels of a patch
        self.answer_head = MLP(c.width, 2 * c.width, c.act, out_dim=len(c.answers)) if c.answers else None
        self.ocr_pointer = OCRPointer(c.width) if c.answers and c.ocr_pointer else None
        self.apply_stage()

    # ----------------------------------------------------------------- housekeeping
    @property
    def preprocess(self) -> Preprocess:
        return self.config.preprocess

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def apply_stage(self) -> None:
        """Set ``requires_grad`` for ``config.stage``: stage ``text`` freezes the shared self-attention, the final
        norm and the vision side (embeddings, vision experts), so the image-only pass stays as stage ``image``
        left it; the other stages train everything."""
        frozen = set(frozen_parameter_names(self)) if self.config.stage == "text" else set()
        for name, param in self.named_parameters():
            param.requires_grad_(name not in frozen)

    def load_pretrained(self, path: str) -> None:
        """Load a saved VLMo (any stage) or a ``.safetensors`` file; see :func:`load_vlmo_weights`."""
        load_vlmo_weights(self, path)

    def scale(self) -> Tensor:
        """The contrastive similarity multiplier ``1 / temperature`` (clamped)."""
        return self.temperature.scale()

    def _mask(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        if attention_mask is None:
            return (input_ids != self.config.pad_token_id).long()
        return attention_mask

    # ----------------------------------------------------------------- embeddings and the multiway stack
    def embed_image(self, images: Tensor, patch_mask: Tensor | None = None) -> Tensor:
        """``[batch, 3, H, W]`` -> class token and patch embeddings with positions and the image type
        ``[batch, 1 + N, width]``; patches where ``patch_mask`` ``[batch, N]`` is True become the mask embedding."""
        x = self.patch_embed(images)  # [batch, N, width]
        if patch_mask is not None:
            x = torch.where(patch_mask[..., None], self.mask_embed.to(x.dtype), x)
        cls = self.cls_token.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)  # [batch, 1 + N, width]
        grid = self.patch_embed.grid(images.shape[-2], images.shape[-1])
        pos = resample_grid(self.image_pos_embed, self.grid, grid, num_prefix=1)
        return x + (pos + self.image_type_embed).to(x.dtype)

    def embed_text(self, input_ids: Tensor) -> Tensor:
        """``[batch, L]`` -> word + position + text type embeddings ``[batch, L, width]``."""
        return self.text_embed(input_ids) + self.text_type_embed

    def routes(self, segments: Sequence[tuple[str, int]]) -> list[list[tuple[str, int]]]:
        """The expert segments of each layer for a sequence of ``(modality, length)`` runs (``text``/``image``):
        the modality experts everywhere, except ``vl`` for all tokens in the top ``fusion_layers`` layers of a
        pass that holds both modalities."""
        modal = [(MODALITY_EXPERT[m], n) for m, n in segments]
        fused = len({m for m, _ in segments}) > 1
        top = [("vl", sum(n for _, n in segments))]
        first_top = self.config.layers - self.config.fusion_layers
        return [top if fused and i >= first_top else modal for i in range(self.config.layers)]

    def encode_tokens(self, x: Tensor, segments: Sequence[tuple[str, int]],
                      key_padding_mask: Tensor | None = None) -> Tensor:
        """Run embedded tokens ``x`` [batch, tokens, width] (laid out as ``segments``) through every layer and
        the final norm -> ``[batch, tokens, width]``."""
        for layer, route in zip(self.layers, self.routes(segments)):
            if self.grad_checkpointing and self.training:
                x = checkpoint(layer, x, route, None, None, key_padding_mask, use_reentrant=False)
            else:
                x = layer(x, segments=route, key_padding_mask=key_padding_mask)
        return self.norm(x)

    # ----------------------------------------------------------------- dual encoder
    def image_features(self, images: Tensor, patch_mask: Tensor | None = None) -> Tensor:
        """Image-only pass: ``[batch, 3, H, W]`` -> ``[batch, 1 + N, width]`` (class token first)."""
        x = self.embed_image(images, patch_mask)
        return self.encode_tokens(x, [("image", x.shape[1])])

    def text_features(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Text-only pass: ``[batch, L]`` -> ``[batch, L, width]`` ([CLS] first)."""
        return self.encode_tokens(self.embed_text(input_ids), [("text", input_ids.shape[1])],
                                  self._mask(input_ids, attention_mask))

    def encode_image(self, images: Tensor, normalize: bool = True) -> Tensor:
        """``[batch, 3, H, W]`` -> contrastive embeddings ``[batch, embed_dim]`` (the class token)."""
        x = self.vision_proj(self.image_features(images)[:, 0])
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None, normalize: bool = True) -> Tensor:
        """``[batch, L]`` token ids -> contrastive embeddings ``[batch, embed_dim]`` (the [CLS] token)."""
        x = self.text_proj(self.text_features(input_ids, attention_mask)[:, 0])
        return F.normalize(x, dim=-1) if normalize else x

    # ----------------------------------------------------------------- fusion encoder
    def fuse_embedded(self, image_embeds: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Fusion pass over ``[text; image]``: ``image_embeds`` [batch, N', width] (from :meth:`embed_image`) and
        ``input_ids`` [batch, L] -> ``[batch, L + N', width]`` (text tokens first)."""
        mask = self._mask(input_ids, attention_mask)
        text = self.embed_text(input_ids)  # [batch, L, width]
        x = torch.cat([text, image_embeds.to(text.dtype)], dim=1)  # [batch, L + N', width]
        image_mask = torch.ones(image_embeds.shape[:2], dtype=mask.dtype, device=mask.device)
        return self.encode_tokens(x, [("text", text.shape[1]), ("image", image_embeds.shape[1])],
                                  torch.cat([mask, image_mask], dim=1))

    def fuse(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """All fused output tokens, text first: ``[batch, L + 1 + N, width]``."""
        return self.fuse_embedded(self.embed_image(images), input_ids, attention_mask)

    def fused_cls(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """The pooled fused [CLS] token, ``[batch, width]``."""
        return self.pooler(self.fuse(images, input_ids, attention_mask)[:, 0])

    def itm_scores(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Probability that each image matches its text, ``[batch]``."""
        return self.match_scores(self.embed_image(images), input_ids, attention_mask)

    def match_features(self, images: Tensor) -> Tensor:
        """The image side of matching, ``[batch, 1 + N, width]``: the image embeddings (every layer of the fusion
        pass mixes image and text tokens, so nothing deeper can be computed once per image)."""
        return self.embed_image(images)

    def match_scores(self, features: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """ITM probability ``[batch]`` that image features row ``i`` (:meth:`match_features`) match text ``i``."""
        cls = self.pooler(self.fuse_embedded(features, input_ids, attention_mask)[:, 0])
        return self.itm_head(cls).softmax(dim=-1)[:, 1]

    def answer_logits(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None,
                      ocr_positions: Tensor | None = None) -> Tensor:
        """VQA logits over ``config.answers``, ``[batch, answers]`` (questions as ``input_ids``), followed by the
        pointer's ``K`` OCR-token scores, ``[batch, answers + K]``, when ``ocr_positions`` ``[batch, K]`` (where
        each OCR token starts in ``input_ids``, -1 for none) is given to a model with ``ocr_pointer``.

        Raises:
            VlkitError: the model has no answer head (``config.answers`` is empty).
        """
        if self.answer_head is None:
            raise VlkitError("this VLMo has no answer head: set config.answers")
        tokens = self.fuse(images, input_ids, attention_mask)  # [batch, L + 1 + N, width]
        pooled = self.pooler(tokens[:, 0])  # [batch, width]
        logits = self.answer_head(pooled)  # [batch, answers]
        if ocr_positions is None or self.ocr_pointer is None:
            return logits
        text = tokens[:, : input_ids.shape[1]]  # [batch, L, width]
        return torch.cat([logits, self.ocr_pointer(pooled, text, ocr_positions).to(logits.dtype)], dim=-1)

    # ----------------------------------------------------------------- entry points
    def pretrain_losses(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None,
                        group_ids: Tensor | None = None, mask_token_id: int | None = None,
                        generator: torch.Generator | None = None, *, word_ids: Tensor | None = None) -> VLMoOutput:
        """The losses of ``config.stage`` on a batch of image-text pairs (see
        :func:`vlkit.models.vlmo.pretrain.pretrain_losses`)."""
        return pretrain_losses(self, images, input_ids, self._mask(input_ids, attention_mask), group_ids,
                               mask_token_id, generator, word_ids)

    def forward(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None,
                head: str = "contrastive", **kwargs: Any) -> TwoTowerOutput | VLMoOutput | Tensor:
        """One entry point for every use, so that wrappers that act on ``forward`` (DDP, FSDP) see each of them.

        Args:
            head: ``contrastive``: both contrastive embeddings as a :class:`TwoTowerOutput`; ``pretrain``:
                :meth:`pretrain_losses` (``kwargs`` are passed on); ``itm``: :meth:`itm_scores`; ``answer``:
                :meth:`answer_logits`; ``cls``: :meth:`fused_cls` ``[batch, width]``.

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
            return self.fused_cls(images, input_ids, attention_mask)
        raise VlkitError(f"unknown VLMo head {head!r}; choose contrastive, pretrain, itm, answer or cls")
