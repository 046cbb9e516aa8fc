"""BLIP-2 (Li et al. 2023, "Bootstrapping Language-Image Pre-training with Frozen Image Encoders and Large Language
Models"): a frozen image encoder, a Querying Transformer (:class:`~vlkit.modules.fusion.qformer.QFormer`) whose
learned queries read the image, and, in stage 2, a frozen language model conditioned on the queries.

Stage 1 trains the Q-Former with three objectives, each with its own self-attention mask:

- ITC (``unimodal``): the queries' outputs, projected and normalised, are the image's embeddings
  ``[batch, Q, embed_dim]``; the text's is its projected [CLS]; an image and a text score the *max over queries*
  of their cosines.
- ITM (``bidirectional``): queries and text see each other; the ITM head's logits are averaged over the query
  outputs; the negatives are mined from the ITC similarities (ALBEF's hard negatives).
- ITG (``causal``): the text, starting with a learned [DEC] embedding in place of its first token's, predicts
  each next token while seeing every query and the text before it; the queries see only themselves.

For indexes and retrieval :meth:`BLIP2.encode_image` gives ONE vector per image, the normalised mean of the query
embeddings. The contrastive loss scores with the max over queries instead, so retrieval by the index is an
approximation; re-ranking its top candidates with the ITM head (``--rerank K``, through :meth:`BLIP2.match_features`
and :meth:`BLIP2.match_scores`) corrects it.

Stage 2 (``language_model`` set) adds a linear projection of the image-only query outputs to a language model's
width and the decoding interface of :mod:`vlkit.inference.interface`; see :mod:`vlkit.models.blip2.language`.
:meth:`BLIP2.load_pretrained` starts it from a stage-1 model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlkit.errors import VlkitError
from vlkit.inference.interface import GenerationSpec
from vlkit.models.blip2.config import BLIP2Config, BLIP2Output
from vlkit.models.blip2.image import FrozenImageEncoder
from vlkit.models.blip2.language import build_language_model, lm_spec
from vlkit.models.outputs import TwoTowerOutput
from vlkit.models.preprocess import Preprocess
from vlkit.modules.decoders.bert_decoder import BertLMHead
from vlkit.modules.encoders.hf_text import resolve_text_encoder_path
from vlkit.modules.fusion.itm import ITMHead, hard_negatives, itm_loss
from vlkit.modules.fusion.qformer import QFormer, hf_bert_sizes, load_hf_bert_into_qformer
from vlkit.modules.layers.decoder_cache import DecoderCache
from vlkit.modules.losses.captioning import caption_labels, caption_loss
from vlkit.modules.losses.contrastive import LearnableLogitScale, pair_cross_entropy

#: saved-config fields whose difference makes a model's weights unfit (named when loading fails)
SHAPE_FIELDS = ("image_encoder", "image_size", "patch_size", "vision_width", "vision_layers", "num_queries",
                "vocab_size", "width", "layers", "heads", "mlp_dim", "cross_attention_freq", "context_length",
                "embed_dim")


class BLIP2(nn.Module):
    """Frozen image encoder, Q-Former, stage-1 heads and (stage 2) a language model; see the module docstring.

    Args:
        config: sizes and switches.
        load_pretrained_encoders: load the pretrained weights the config names (EfficientNet-Lite0, a BERT for the
            Q-Former, the language model); False when a whole model's weights are loaded afterwards.

    Example:
        >>> model = vlkit.create_model("blip2-tiny")
        >>> out = model.pretrain_losses(images, input_ids, attention_mask)   # BLIP2Output: itc, itm, lm
        >>> model.match_scores(model.match_features(images), input_ids)      # [batch] ITM probabilities
    """

    architecture = "blip2"
    config_class = BLIP2Config

    def __init__(self, config: BLIP2Config, load_pretrained_encoders: bool = True):
        super().__init__()
        c = self.config = config
        if c.stage not in (1, 2):
            raise VlkitError(f"BLIP-2 stage must be 1 or 2, got {c.stage}")
        if c.stage == 2 and not c.language_model:
            raise VlkitError("a stage-2 BLIP-2 needs a language_model (bert, minilm or a local model directory)")
        self.image_encoder = FrozenImageEncoder(c.image_encoder, c.image_size, c.patch_size, c.vision_width,
                                                c.vision_layers, c.vision_heads,
                                                c.backbone_pretrained and load_pretrained_encoders)
        if c.qformer_init is not None:  # the checkpoint decides the sizes; the saved config records them
            sizes = hf_bert_sizes(resolve_text_encoder_path(c.qformer_init))
            c.vocab_size, c.width, c.layers = sizes["vocab_size"], sizes["width"], sizes["layers"]
            c.heads = sizes["heads"]
            c.mlp_dim, c.act, c.norm_eps = sizes["mlp_dim"], sizes["act"], sizes["norm_eps"]
            c.context_length = min(c.context_length, sizes["max_positions"])
            if c.preprocess.tokenizer is None:
                c.preprocess.tokenizer = c.qformer_init  # the BERT's own WordPiece tokenizer
        if c.preprocess.context_length > c.context_length:
            raise VlkitError(f"preprocess.context_length {c.preprocess.context_length} exceeds the Q-Former's "
                             f"context_length {c.context_length}")
        self.qformer = QFormer(c.vocab_size, c.width, c.layers, c.heads, c.mlp_dim, c.num_queries,
                               self.image_encoder.width, c.context_length, c.cross_attention_freq, c.act, c.norm_eps,
                               c.dropout)
        if c.qformer_init is not None and load_pretrained_encoders:
            load_hf_bert_into_qformer(self.qformer, resolve_text_encoder_path(c.qformer_init))
        self.vision_proj = nn.Linear(c.width, c.embed_dim)
        self.text_proj = nn.Linear(c.width, c.embed_dim)
        self.temperature = LearnableLogitScale(c.init_temperature, c.max_logit_scale)
        self.itm_head = ITMHead(c.width)
        self.dec_embedding = nn.Parameter(torch.randn(c.width) * 0.02)  # BLIP-2's [DEC] start of generation
        self.lm_head = BertLMHead(c.width, c.act, c.norm_eps)
        self.lm_bias = nn.Parameter(torch.zeros(c.vocab_size))
        # learning-rate groups: the Q-Former's BERT-shaped parts (embeddings, self-attention, feed-forward) at the
        # text rate; its queries and cross-attention, the projections, heads and the language model's new parts at
        # the head rate (the frozen image encoder has nothing to train)
        self.LR_GROUPS = {"image": ("image_encoder.",),
                          "text": ("qformer.embed.", "qformer.embed_norm.",
                                   *(f"qformer.layers.{i}.{part}." for i in range(c.layers)
                                     for part in ("self_attn", "ln_self", "ffn", "ln_ffn")))}
        self.language = None
        if c.stage == 2:
            sizes = dict(vocab_size=c.vocab_size, decoder_width=c.decoder_width, decoder_layers=c.decoder_layers,
                         decoder_heads=c.decoder_heads, decoder_mlp_dim=c.decoder_mlp_dim,
                         max_positions=c.max_positions, dropout=c.dropout)
            self.language = build_language_model(c.language_model, c.width, c.num_queries, sizes,
                                                  load_pretrained_encoders)
            spec = self.generation
            c.lm_bos_token_id, c.lm_eos_token_id, c.lm_pad_token_id = spec.bos_token_id, spec.eos_token_id, \
                spec.pad_token_id
            c.lm_vocab_size = spec.vocab_size
            if not hasattr(self.language, "decoder"):  # a causal LM writes with its own tokenizer
                c.preprocess.tokenizer = c.language_model

    @property
    def preprocess(self) -> Preprocess:
        return self.config.preprocess

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Not supported (the frozen encoder keeps no activations; the Q-Former is small)."""

    def scale(self) -> Tensor:
        """The contrastive similarity multiplier ``1 / temperature`` (clamped)."""
        return self.temperature.scale()

    def _mask(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        if attention_mask is None:
            return (input_ids != self.config.pad_token_id).long()
        return attention_mask

    # ----------------------------------------------------------------- towers
    def image_tokens(self, images: Tensor) -> Tensor:
        """``[batch, 3, H, W]`` -> the tokens the queries read, ``[batch, N, image width]``."""
        return self.image_encoder(images)

    def query_output(self, image_tokens: Tensor) -> Tensor:
        """The image-only Q-Former pass: ``[batch, Q, width]``."""
        return self.qformer(image_tokens).queries

    def image_query_embeds(self, images: Tensor) -> Tensor:
        """Normalised ITC embeddings of every query, ``[batch, Q, embed_dim]``."""
        return F.normalize(self.vision_proj(self.query_output(self.image_tokens(images))), dim=-1)

    def encode_image(self, images: Tensor, normalize: bool = True) -> Tensor:
        """ONE embedding per image, ``[batch, embed_dim]``: the normalised mean of the query embeddings (an
        approximation of the max-over-queries score the model trains with; see the module docstring)."""
        x = self.image_query_embeds(images).mean(dim=1)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None, normalize: bool = True) -> Tensor:
        """``[batch, L]`` -> the projected [CLS] of the text-only pass, ``[batch, embed_dim]``."""
        text = self.qformer(None, input_ids, self._mask(input_ids, attention_mask), queries=False).text
        x = self.text_proj(text[:, 0])
        return F.normalize(x, dim=-1) if normalize else x

    def similarity(self, image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
        """The ITC similarity: max over queries of the cosines, ``[n_images, Q, dim]`` x ``[n_texts, dim]`` ->
        ``[n_images, n_texts]``."""
        return torch.einsum("iqd,td->itq", image_embeds, text_embeds).amax(dim=-1)

    # ----------------------------------------------------------------- matching and fusion
    def match_features(self, images: Tensor) -> Tensor:
        """The image side of matching: the frozen encoder's normalised tokens ``[batch, N, image width]``."""
        return self.image_tokens(images)

    def fuse(self, image_tokens: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Queries and text seeing each other (the ITM pass): the query outputs ``[batch, Q, width]``."""
        return self.qformer(image_tokens, input_ids, self._mask(input_ids, attention_mask), "bidirectional").queries

    def itm_logits(self, image_tokens: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """ITM logits ``[batch, 2]``: the head on every query output, averaged over the queries."""
        return self.itm_head(self.fuse(image_tokens, input_ids, attention_mask)).mean(dim=1)

    def match_scores(self, features: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Probability that image row ``i`` (from :meth:`match_features`) matches text ``i``, ``[batch]``."""
        return self.itm_logits(features, input_ids, attention_mask).softmax(dim=-1)[:, 1]

    def itm_scores(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Probability that each image matches its text, ``[batch]``."""
        return self.match_scores(self.match_features(images), input_ids, attention_mask)

    def text_logits(self, hidden: Tensor) -> Tensor:
        """The Q-Former's language-model head (tied to its word embeddings): ``[..., width]`` -> ``[..., vocab]``."""
        return F.linear(self.lm_head(hidden), self.qformer.word_embeddings.weight, self.lm_bias)

    def forward(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None,
                head: str = "contrastive", **kwargs: Any) -> TwoTowerOutput | BLIP2Output | Tensor:
        """One entry point for every use, so that wrappers that act on ``forward`` (DDP, FSDP) see each of them.

        Args:
            head: ``contrastive``: both towers' embeddings (:class:`TwoTowerOutput`); ``pretrain``:
                :meth:`pretrain_losses` (``kwargs`` passed on); ``itm``: :meth:`itm_scores`; ``caption``:
                :meth:`caption_logits` (stage 2); ``cls``: the fused query outputs' mean ``[batch, width]``.

        Raises:
            VlkitError: an unknown head.
        """
        if head == "contrastive":
            return TwoTowerOutput(self.encode_image(images), self.encode_text(input_ids, attention_mask), self.scale())
        if head == "pretrain":
            return self.pretrain_losses(images, input_ids, attention_mask, **kwargs)
        if head == "itm":
            return self.itm_scores(images, input_ids, attention_mask)
        if head == "caption":
            return self.caption_logits(images, input_ids, attention_mask)
        if head == "cls":
            return self.fuse(self.image_tokens(images), input_ids, attention_mask).mean(dim=1)
        raise VlkitError(f"unknown BLIP-2 head {head!r}; choose contrastive, pretrain, itm, caption or cls")

    # ----------------------------------------------------------------- stage 1
    def pretrain_losses(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None,
                        group_ids: Tensor | None = None, generator: torch.Generator | None = None) -> BLIP2Output:
        """ITC + ITM + ITG on a batch of image-text pairs (stage 1).

        Args:
            images: ``[batch, 3, H, W]``.
            input_ids: ``[batch, L]``, starting with [CLS]; row ``i`` describes image ``i``.
            attention_mask: ``[batch, L]`` (None: derived from ``pad_token_id``).
            group_ids: ``[batch]``: pairs of one group are all positives of each other in ITC and never drawn as
                ITM negatives of each other.
            generator: random generator for the hard negatives.

        Returns:
            :class:`BLIP2Output`.
        """
        mask = self._mask(input_ids, attention_mask)
        batch = input_ids.shape[0]
        img = self.image_tokens(images)  # [batch, N, image width]
        uni = self.qformer(img, input_ids, mask, "unimodal")
        image_embeds = F.normalize(self.vision_proj(uni.queries), dim=-1)  # [batch, Q, embed_dim]
        text_embeds = F.normalize(self.text_proj(uni.text[:, 0]), dim=-1)  # [batch, embed_dim]
        logits = self.scale() * self.similarity(image_embeds, text_embeds)  # [images, texts]
        itc = (pair_cross_entropy(logits, group_ids, group_ids)
               + pair_cross_entropy(logits.T, group_ids, group_ids)) / 2

        # ITM on the positives, a hard negative text per image and a hard negative image per text
        neg = hard_negatives(logits, logits.T, group_ids, generator)
        cls = self.itm_logits(torch.cat([img, img, img[neg.image_index]]),
                              torch.cat([input_ids, input_ids[neg.text_index], input_ids]),
                              torch.cat([mask, mask[neg.text_index], mask]))  # [3 * batch, 2]
        itm = itm_loss(cls[:batch], cls[batch:])

        # ITG: the captions under the multimodal-causal mask, [DEC] first
        text = self.qformer(img, input_ids, mask, "causal", first_embedding=self.dec_embedding).text
        lm = caption_loss(self.text_logits(text), caption_labels(input_ids, mask))
        return BLIP2Output(loss=itc + itm.loss + lm.loss, itc=itc, itm=itm.loss, lm=lm.loss,
                           itm_accuracy=itm.accuracy, lm_accuracy=lm.accuracy)

    # ----------------------------------------------------------------- stage 2: the decoding interface
    @property
    def generation(self) -> GenerationSpec | None:
        """The language model's token ids and limits (None in stage 1: nothing to write with)."""
        if self.language is None:
            return None
        c = self.config
        return lm_spec(self.language, c.bos_token_id, c.eos_token_id, c.pad_token_id)

    def _language(self):
        if self.language is None:
            raise VlkitError("a stage-1 BLIP-2 has no language model: build it with stage=2 and a language_model")
        return self.language

    def language_queries(self, images: Tensor) -> Tensor:
        """The image-only query outputs the language model reads, ``[batch, Q, width]`` (before its projection)."""
        return self.query_output(self.image_tokens(images))

    def caption_logits(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Teacher forcing: ``[batch, length, vocab]``, position ``t`` predicting token ``t + 1``."""
        return self._language().logits(self.language_queries(images), input_ids, attention_mask)

    def start_decoding(self, images: Tensor, max_length: int) -> DecoderCache:
        """Encode ``images`` once; a cache to decode up to ``max_length`` tokens with."""
        return self._language().start(self.language_queries(images), max_length)

    def decode_step(self, input_ids: Tensor, cache: DecoderCache) -> Tensor:
        """Logits ``[batch, new, vocab]`` of the tokens ``[batch, new]`` after those ``cache`` holds."""
        return self._language().step(input_ids, cache)

    # ----------------------------------------------------------------- weights
    def load_pretrained(self, path: str | Path) -> None:
        """Load a saved BLIP-2 (a model directory or a ``.safetensors`` file). A stage-2 model may start from a
        stage-1 one: the language model and its projection (``language.*``) are then the only keys allowed to be
        missing, and keep their built (pretrained or random) values.

        Raises:
            VlkitError: a missing key outside ``language.``, an unexpected key or a shape mismatch (named, with the
                saved config's differing sizes when ``path`` is a model directory).
        """
        from safetensors.torch import load_file

        from vlkit.models.io import WEIGHTS_NAME, read_config

        path = Path(path)
        file = path / WEIGHTS_NAME if path.is_dir() else path
        if not file.exists():
            raise VlkitError(f"{path}: no weights found ({file.name} missing)")
        state = load_file(str(file))
        own = self.state_dict()
        missing = sorted(k for k in set(own) - set(state) if not k.startswith("language."))
        unexpected = sorted(set(state) - set(own))
        shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(set(own) & set(state))
                  if state[k].shape != own[k].shape]
        if missing or unexpected or shapes:
            problems = [f"{what} {keys[:10]}" for what, keys in (("missing keys", missing),
                        ("unexpected keys", unexpected), ("shape mismatches", shapes)) if keys]
            if path.is_dir():
                saved = read_config(path).get("config", {})
                diff = [f"{k}={saved[k]!r} (this model: {getattr(self.config, k)!r})" for k in SHAPE_FIELDS
                        if k in saved and saved[k] != getattr(self.config, k)]
                if diff:
                    problems.append("the saved model was built with " + ", ".join(diff))
            raise VlkitError(f"{file}: weights do not fit this BLIP-2: " + "; ".join(problems))
        self.load_state_dict(state, strict=False)
