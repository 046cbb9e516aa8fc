"""The configuration and the outputs of a :class:`~vlkit.models.blip2.model.BLIP2`."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from vlkit.models.preprocess import CLIP_MEAN, CLIP_STD, Preprocess


def _default_preprocess() -> Preprocess:
    return Preprocess(image_size=224, mean=CLIP_MEAN, std=CLIP_STD, context_length=32, tokenizer=None)


@dataclass
class BLIP2Config:
    """Sizes, token ids and switches of a :class:`~vlkit.models.blip2.model.BLIP2`.

    Attributes:
        stage: 1 (representation learning: ITC + ITM + ITG on the Q-Former) or 2 (generative learning: the
            query outputs condition a frozen language model).
        image_encoder: ``vit`` (a :class:`~vlkit.modules.encoders.vit.VisionTransformer`) or
            ``efficientnet_lite0`` (the 7x7 grid of its last feature map at 224 px); frozen either way.
        backbone_pretrained: load EfficientNet-Lite0's ImageNet weights.
        image_size, patch_size, vision_width, vision_layers, vision_heads: the ViT.
        num_queries: learned queries of the Q-Former (32 in BLIP-2).
        qformer_init: a local BERT directory or ``minilm`` to start the Q-Former from (its sizes replace
            ``vocab_size``, ``width``, ``layers``, ``heads``, ``mlp_dim``); None: random.
        vocab_size, width, layers, heads, mlp_dim: the Q-Former.
        cross_attention_freq: the queries cross-attend to the image every this many layers (2 in BLIP-2).
        context_length: most text tokens of the Q-Former.
        pad_token_id, bos_token_id, eos_token_id: padding, start ([CLS]) and end ([SEP]) ids of the text.
        embed_dim: width of the contrastive space.
        init_temperature, max_logit_scale: the learnable contrastive temperature.
        act, norm_eps, dropout: of the Q-Former (and of a random BERT language model).
        language_model: stage 2's decoder: ``bert`` (a random BERT decoder of the ``decoder_*`` sizes over the
            Q-Former's vocabulary, trained whole), ``minilm`` or a local BERT directory (a BERT decoder whose
            pretrained parts stay frozen), or a local Hugging Face causal LM directory (frozen entirely, fed the
            projected queries as a soft prompt). None in stage 1.
        decoder_width, decoder_layers, decoder_heads, decoder_mlp_dim: the random ``bert`` decoder.
        max_positions: most caption tokens of the language model (start and end included).
        lm_bos_token_id, lm_eos_token_id, lm_pad_token_id, lm_vocab_size: the language model's ids (filled in
            when it is built).
    """

    stage: int = 1
    image_encoder: str = "vit"
    backbone_pretrained: bool = True
    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    num_queries: int = 32
    qformer_init: str | None = None
    vocab_size: int = 30522
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    cross_attention_freq: int = 2
    context_length: int = 32
    pad_token_id: int = 0
    bos_token_id: int = 101
    eos_token_id: int = 102
    embed_dim: int = 256
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0
    act: str = "gelu"
    norm_eps: float = 1e-12
    dropout: float = 0.0
    language_model: str | None = None
    decoder_width: int = 256
    decoder_layers: int = 2
    decoder_heads: int = 4
    decoder_mlp_dim: int = 1024
    max_positions: int = 32
    lm_bos_token_id: int | None = None
    lm_eos_token_id: int | None = None
    lm_pad_token_id: int | None = None
    lm_vocab_size: int | None = None
    preprocess: Preprocess = field(default_factory=_default_preprocess)

    @property
    def text_width(self) -> int:
        """The width of the fused features (what classification heads read)."""
        return self.width


@dataclass
class BLIP2Output:
    """The stage-1 losses of a batch.

    Attributes:
        loss: ``itc + itm + lm``.
        itc: image-text contrastive loss (image-text similarity: the max over queries).
        itm: image-text matching loss over the positives and the mined hard negatives.
        lm: image-grounded text generation loss (next-token cross-entropy of the captions).
        itm_accuracy: ITM accuracy over positives and negatives (no gradient).
        lm_accuracy: next-token accuracy of the captions (no gradient).
    """

    loss: Tensor
    itc: Tensor
    itm: Tensor
    lm: Tensor
    itm_accuracy: Tensor
    lm_accuracy: Tensor


@dataclass
class BLIP2CaptionOutput:
    """The stage-2 loss of a batch of captions.

    Attributes:
        loss: the language-modelling loss (``lm``).
        lm: next-token cross-entropy of the captions given the images.
        lm_accuracy: next-token accuracy (no gradient).
    """

    loss: Tensor
    lm: Tensor
    lm_accuracy: Tensor
