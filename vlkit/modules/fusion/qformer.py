"""BLIP-2's Querying Transformer (Q-Former, Li et al. 2023): a BERT-shaped (post-norm) encoder whose sequence is
``N`` learned query vectors followed by text tokens.

Every layer runs one self-attention over queries and text together; which token may see which is set by an
attention mask (:func:`qformer_attention_mask`), so one set of weights serves BLIP-2's three objectives:

- ``unimodal`` (image-text contrastive): queries see queries, text sees text;
- ``bidirectional`` (image-text matching): every token sees every token;
- ``causal`` (image-grounded text generation): queries see queries only, a text token sees every query and the
  text up to itself.

Only the queries cross-attend to the frozen image encoder's tokens, in every ``cross_attention_freq``-th layer
(0, 2, 4, ... with the default 2). Queries and text go through separate feed-forward blocks
(:class:`~vlkit.modules.layers.multiway.MultiwayMLP` with the experts ``query`` and ``text``), each followed by its
own LayerNorm. Text positions start at 0 after the queries; the queries have no positions. The queries and the
text embeddings share the embedding LayerNorm.

:func:`load_hf_bert_into_qformer` starts a Q-Former from a local BERT directory (all-MiniLM-L6-v2, BERT-base):
the embeddings, the self-attention and the feed-forward layers are copied, the feed-forward ones into both the
query and the text experts; cross-attention and the queries start random.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from vlkit.errors import VlkitError
from vlkit.modules.fusion.text_encoder import TextEmbeddings
from vlkit.modules.layers.attention import MultiHeadAttention
from vlkit.modules.layers.multiway import MultiwayMLP

MASK_KINDS = ("unimodal", "bidirectional", "causal")
EXPERTS = ("query", "text")


def qformer_attention_mask(kind: str, num_queries: int, text_mask: Tensor | None, text_length: int = 0,
                           batch: int = 1, device: torch.device | None = None) -> Tensor:
    """The Q-Former's self-attention mask over ``[queries; text]``, boolean ``[batch, Q + L, Q + L]`` (True =
    attend; rows are the attending tokens).

    Args:
        kind: ``unimodal``, ``bidirectional`` or ``causal`` (see the module docstring).
        num_queries: ``Q``.
        text_mask: ``[batch, L]`` 1 on real text tokens (None: ``text_length`` tokens, all real).
        text_length: ``L`` when ``text_mask`` is None.
        batch: rows when ``text_mask`` is None.
        device: device when ``text_mask`` is None.

    Raises:
        VlkitError: an unknown kind.
    """
    if kind not in MASK_KINDS:
        raise VlkitError(f"unknown Q-Former mask {kind!r}; choose one of {', '.join(MASK_KINDS)}")
    if text_mask is not None:
        batch, text_length, device = text_mask.shape[0], text_mask.shape[1], text_mask.device
    q, n = num_queries, num_queries + text_length
    is_query = torch.arange(n, device=device) < q  # [n]
    if kind == "bidirectional":
        allowed = torch.ones(n, n, dtype=torch.bool, device=device)
    elif kind == "unimodal":
        allowed = is_query[:, None] == is_query[None, :]
    else:  # causal: queries see queries; text sees the queries and the text up to itself
        allowed = torch.ones(n, n, dtype=torch.bool, device=device).tril() | is_query[None, :]
        allowed &= ~(is_query[:, None] & ~is_query[None, :])
    allowed = allowed[None].expand(batch, n, n)
    if text_mask is None:
        return allowed
    real = torch.cat([torch.ones(batch, q, dtype=torch.bool, device=device), text_mask.bool()], dim=1)  # [batch, n]
    eye = torch.eye(n, dtype=torch.bool, device=device)[None]  # a padding row still sees itself
    return (allowed & real[:, None, :]) | eye


class QFormerLayer(nn.Module):
    """One post-norm layer: shared self-attention, cross-attention for the queries (optional), then a
    feed-forward block and LayerNorm per expert (``query``, ``text``).

    Args:
        dim: width.
        num_heads: attention heads.
        mlp_dim: feed-forward inner width.
        context_dim: width of the image tokens (None: this layer has no cross-attention).
        act: feed-forward activation.
        norm_eps: LayerNorm epsilon.
        dropout: dropout on the residual branches and the attention weights (training only).
    """

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, context_dim: int | None = None, act: str = "gelu",
                 norm_eps: float = 1e-12, dropout: float = 0.0):
        super().__init__()
        self.self_attn = MultiHeadAttention(dim, num_heads, dropout=dropout)
        self.ln_self = nn.LayerNorm(dim, eps=norm_eps)
        self.cross_attn = None if context_dim is None else MultiHeadAttention(dim, num_heads, context_dim,
                                                                              dropout=dropout)
        self.ln_cross = None if context_dim is None else nn.LayerNorm(dim, eps=norm_eps)
        self.ffn = MultiwayMLP(dim, mlp_dim, EXPERTS, act, norm_eps, pre_norm=False)
        self.ln_ffn = nn.ModuleDict({name: nn.LayerNorm(dim, eps=norm_eps) for name in EXPERTS})
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, num_queries: int, context: Tensor | None = None,
                attn_mask: Tensor | None = None) -> Tensor:
        """``x`` [batch, Q + L, dim] (queries first) -> ``[batch, Q + L, dim]``.

        Args:
            num_queries: ``Q`` (0: a text-only pass; no cross-attention then).
            context: image tokens ``[batch, N, context_dim]`` the queries cross-attend to.
            attn_mask: boolean ``[batch, Q + L, Q + L]`` from :func:`qformer_attention_mask` (None: all see all).
        """
        x = self.ln_self(x + self.drop(self.self_attn(x, attn_mask=attn_mask)))
        q = num_queries
        if self.cross_attn is not None and q:
            if context is None:
                raise VlkitError("the Q-Former's queries cross-attend to image tokens: give a context")
            queries = x[:, :q]
            queries = self.ln_cross(queries + self.drop(self.cross_attn(queries, context)))
            x = torch.cat([queries, x[:, q:]], dim=1)
        segments = [(name, n) for name, n in zip(EXPERTS, (q, x.shape[1] - q)) if n]
        h = self.ffn(x, segments)
        parts, start = [], 0
        for name, n in segments:
            parts.append(self.ln_ffn[name](x[:, start:start + n] + self.drop(h[:, start:start + n])))
            start += n
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


@dataclass
class QFormerOutput:
    """Last hidden states of a Q-Former pass.

    Attributes:
        queries: ``[batch, Q, dim]`` (None in a text-only pass).
        text: ``[batch, L, dim]`` (None in a query-only pass).
    """

    queries: Tensor | None
    text: Tensor | None


class QFormer(nn.Module):
    """Learned queries and text through shared self-attention; the queries read the image (module docstring).

    Args:
        vocab_size: text token ids.
        dim: width.
        num_layers: layers.
        num_heads: attention heads.
        mlp_dim: feed-forward inner width.
        num_queries: learned queries ``Q``.
        context_dim: width of the image tokens.
        max_positions: most text tokens.
        cross_attention_freq: a cross-attention layer every this many layers, from the first.
        act: feed-forward activation.
        norm_eps: LayerNorm epsilon.
        dropout: dropout on embeddings, residual branches and attention weights.
    """

    def __init__(self, vocab_size: int, dim: int, num_layers: int, num_heads: int, mlp_dim: int, num_queries: int,
                 context_dim: int, max_positions: int = 512, cross_attention_freq: int = 2, act: str = "gelu",
                 norm_eps: float = 1e-12, dropout: float = 0.0):
        super().__init__()
        if cross_attention_freq < 1:
            raise VlkitError(f"cross_attention_freq must be at least 1, got {cross_attention_freq}")
        self.dim, self.num_queries, self.num_heads, self.mlp_dim = dim, num_queries, num_heads, mlp_dim
        self.query_tokens = nn.Parameter(torch.randn(num_queries, dim) * 0.02)
        self.embed = TextEmbeddings(vocab_size, dim, max_positions)
        self.embed_norm = nn.LayerNorm(dim, eps=norm_eps)
        self.embed_drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList([
            QFormerLayer(dim, num_heads, mlp_dim, context_dim if i % cross_attention_freq == 0 else None, act,
                         norm_eps, dropout) for i in range(num_layers)])

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.embed.word_embed

    def forward(self, image_tokens: Tensor | None = None, input_ids: Tensor | None = None,
                attention_mask: Tensor | None = None, mask: str = "bidirectional", queries: bool = True,
                first_embedding: Tensor | None = None) -> QFormerOutput:
        """One pass over ``[queries; text]``.

        Args:
            image_tokens: ``[batch, N, context_dim]`` (needed with ``queries``).
            input_ids: ``[batch, L]`` text (None: a query-only pass).
            attention_mask: ``[batch, L]`` 1 on real text tokens (None: all real).
            mask: ``unimodal``, ``bidirectional`` or ``causal`` (see :func:`qformer_attention_mask`).
            queries: include the queries (False: a text-only pass, no image needed).
            first_embedding: ``[dim]`` replaces the first text token's word embedding (BLIP-2's [DEC] marker
                of image-grounded generation).

        Returns:
            :class:`QFormerOutput`.
        """
        if input_ids is None and not queries:
            raise VlkitError("a Q-Former pass needs queries, text or both")
        parts = []
        if queries:
            if image_tokens is None:
                raise VlkitError("the Q-Former's queries need image tokens")
            parts.append(self.query_tokens.to(image_tokens.dtype)[None].expand(image_tokens.shape[0], -1, -1))
        if input_ids is not None:
            text = self.embed(input_ids)  # [batch, L, dim]
            if first_embedding is not None:
                start = first_embedding + self.embed.pos_embed[0]  # [dim]
                text = torch.cat([start.to(text.dtype)[None, None].expand(text.shape[0], 1, -1), text[:, 1:]], dim=1)
            parts.append(text)
        x = self.embed_drop(self.embed_norm(torch.cat(parts, dim=1)))  # [batch, Q + L, dim]
        q = self.num_queries if queries else 0
        attn_mask = None  # a query-only pass, or text and queries all seeing all without padding: no mask
        masked = attention_mask is not None or mask == "causal" or (q and mask != "bidirectional")
        if input_ids is not None and masked:
            attn_mask = qformer_attention_mask(mask, q, attention_mask, input_ids.shape[1], x.shape[0], x.device)
        for layer in self.layers:
            x = layer(x, q, image_tokens if q else None, attn_mask)
        return QFormerOutput(queries=x[:, :q] if q else None, text=x[:, q:] if input_ids is not None else None)


def _bert_state(path: Path) -> tuple[dict, dict[str, Tensor]]:
    from vlkit.modules.decoders.bert_decoder import _read_weights

    config = json.loads((path / "config.json").read_text())
    if config.get("model_type") != "bert":
        raise VlkitError(f"{path}: a BERT checkpoint is needed, found model_type {config.get('model_type')!r}")
    return config, _read_weights(path)


def hf_bert_sizes(path: str | Path) -> dict[str, int | float | str]:
    """The Q-Former sizes of a local BERT directory: ``vocab_size``, ``width``, ``layers``, ``heads``,
    ``mlp_dim``, ``max_positions``, ``act``, ``norm_eps``."""
    config = json.loads((Path(path) / "config.json").read_text())
    return {"vocab_size": config["vocab_size"], "width": config["hidden_size"], "layers": config["num_hidden_layers"],
            "heads": config["num_attention_heads"], "mlp_dim": config["intermediate_size"],
            "max_positions": config["max_position_embeddings"], "act": config.get("hidden_act", "gelu"),
            "norm_eps": config.get("layer_norm_eps", 1e-12)}


def load_hf_bert_into_qformer(qformer: QFormer, path: str | Path) -> None:
    """Copy a local BERT's embeddings, self-attention and feed-forward layers into ``qformer`` (of the same
    sizes, e.g. built from :func:`hf_bert_sizes`); the feed-forward layers go into both experts. The token-type-0
    embedding is folded into the position table (both are added to every text token).

    Raises:
        VlkitError: not a BERT directory, or a weight missing or of the wrong shape (named).
    """
    from vlkit.modules.decoders.bert_decoder import from_hf_bert_state_dict

    path = Path(path)
    _, state = _bert_state(path)
    positions = qformer.embed.pos_embed.shape[0]
    try:
        bert = from_hf_bert_state_dict(state, len(qformer.layers), positions, cross_attention=False)
    except KeyError as exc:
        raise VlkitError(f"{path}: missing BERT weight {exc.args[0]}") from None
    own = {"embed.word_embed.weight": bert["word_embed.weight"],
           "embed.pos_embed": bert["pos_embed.weight"] + bert["type_embed"],
           "embed_norm.weight": bert["embed_norm.weight"], "embed_norm.bias": bert["embed_norm.bias"]}
    for i in range(len(qformer.layers)):
        src, dst = f"layers.{i}.", f"layers.{i}."
        for kind in ("weight", "bias"):
            for name in ("self_attn.in_proj", "self_attn.out_proj", "ln_self"):
                own[f"{dst}{name}.{kind}"] = bert[f"{src}{name}.{kind}"]
            for expert in EXPERTS:
                own[f"{dst}ffn.mlps.{expert}.fc1.{kind}"] = bert[f"{src}mlp.fc1.{kind}"]
                own[f"{dst}ffn.mlps.{expert}.fc2.{kind}"] = bert[f"{src}mlp.fc2.{kind}"]
                own[f"{dst}ln_ffn.{expert}.{kind}"] = bert[f"{src}ln_mlp.{kind}"]
    expected = qformer.state_dict()
    problems = [f"{k}: {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in own.items()
                if k not in expected or v.shape != expected[k].shape]
    if problems:
        raise VlkitError(f"{path}: BERT weights do not fit the Q-Former: {problems[:5]}")
    qformer.load_state_dict(own, strict=False)


__all__ = ["QFormer", "QFormerLayer", "QFormerOutput", "qformer_attention_mask", "hf_bert_sizes",
           "load_hf_bert_into_qformer"]
