"""A BERT-shaped (post-norm) causal text decoder with cross-attention to image tokens, as BLIP's captioner.

Embeddings (word + position + token type 0) -> LayerNorm; each layer: causal self-attention -> add & LayerNorm
-> cross-attention to the context -> add & LayerNorm -> feed-forward -> add & LayerNorm; the language-model
head: dense -> GELU -> LayerNorm -> the word embeddings (tied) plus a bias.

:meth:`BertTextDecoder.from_hf_bert` starts it from a local BERT directory (e.g. all-MiniLM-L6-v2): the
embeddings, self-attention and feed-forward layers are copied, the cross-attention layers and the head's transform
start random (an encoder checkpoint has neither). :func:`to_hf_bert_state_dict` and :func:`hf_bert_config` give
the same weights as a ``transformers.BertLMHeadModel`` (``is_decoder=True``, ``add_cross_attention=True``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlkit.errors import VlkitError
from vlkit.modules.layers.attention import KVCache, MultiHeadAttention
from vlkit.modules.layers.decoder_cache import DecoderCache
from vlkit.modules.layers.mlp import MLP, activation


class BertDecoderLayer(nn.Module):
    """One post-norm decoder layer: causal self-attention, cross-attention (optional), feed-forward.

    Args:
        dim: width.
        num_heads: attention heads.
        mlp_dim: feed-forward inner width.
        context_dim: width of the context tokens (None: no cross-attention).
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
        self.mlp = MLP(dim, mlp_dim, act)
        self.ln_mlp = nn.LayerNorm(dim, eps=norm_eps)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None,
                attn_mask: Tensor | None = None, is_causal: bool = True, kv_cache: KVCache | None = None,
                cross_kv: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """``x`` [batch, tokens, dim] -> ``[batch, tokens, dim]``.

        Args:
            context: ``[batch, context, context_dim]`` (or None when ``cross_kv`` is given).
            context_mask: ``[batch, context]`` True on real context tokens.
            attn_mask: boolean self-attention mask ``[batch, tokens, keys]`` (True = attend), replaces
                ``is_causal`` when given.
            is_causal: causal self-attention (False for one new token after a cache: it sees every key).
            kv_cache: the self-attention cache of incremental decoding.
            cross_kv: the cross-attention keys/values of the context, computed once.
        """
        x = self.ln_self(x + self.drop(self.self_attn(x, attn_mask=attn_mask, is_causal=is_causal,
                                                      kv_cache=kv_cache)))
        if self.cross_attn is not None:
            x = self.ln_cross(x + self.drop(self.cross_attn(x, context, key_padding_mask=context_mask,
                                                            context_kv=cross_kv)))
        return self.ln_mlp(x + self.drop(self.mlp(x)))


class BertLMHead(nn.Module):
    """BERT's prediction-head transform (dense -> activation -> LayerNorm); the output projection is tied to
    the word embeddings and lives in :class:`BertTextDecoder`."""

    def __init__(self, dim: int, act: str = "gelu", norm_eps: float = 1e-12):
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.act = activation(act)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.act(self.dense(x)))


class BertTextDecoder(nn.Module):
    """A BERT-shaped causal decoder that cross-attends to a context (see the module docstring).

    Args:
        vocab_size: number of token ids.
        dim: width.
        num_layers: decoder layers.
        num_heads: attention heads.
        mlp_dim: feed-forward inner width.
        max_positions: most tokens (learned positions).
        context_dim: width of the context tokens (default ``dim``); None with ``cross_attention=False``.
        cross_attention: add cross-attention to every layer (False: a causal BERT language model).
        act: activation of the feed-forward layers and of the head's transform.
        norm_eps: LayerNorm epsilon.
        dropout: dropout on embeddings, residual branches and attention weights (training only).
    """

    def __init__(self, vocab_size: int, dim: int, num_layers: int, num_heads: int, mlp_dim: int,
                 max_positions: int = 512, context_dim: int | None = None, cross_attention: bool = True,
                 act: str = "gelu", norm_eps: float = 1e-12, dropout: float = 0.0):
        super().__init__()
        self.vocab_size, self.dim, self.num_heads, self.max_positions = vocab_size, dim, num_heads, max_positions
        self.context_dim = (context_dim or dim) if cross_attention else None
        self.act, self.norm_eps, self.mlp_dim = act, norm_eps, mlp_dim
        self.word_embed = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Embedding(max_positions, dim)
        self.type_embed = nn.Parameter(torch.zeros(dim))  # token type 0, the only one a decoder uses
        self.embed_norm = nn.LayerNorm(dim, eps=norm_eps)
        self.embed_drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList([BertDecoderLayer(dim, num_heads, mlp_dim, self.context_dim, act, norm_eps,
                                                      dropout) for _ in range(num_layers)])
        self.head = BertLMHead(dim, act, norm_eps)
        self.lm_bias = nn.Parameter(torch.zeros(vocab_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """BERT's initialisation: normal(0, 0.02) weights, zero biases, unit LayerNorms."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.type_embed, std=0.02)
        nn.init.zeros_(self.lm_bias)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    # ----------------------------------------------------------------- pieces
    def embed(self, input_ids: Tensor, start: int = 0) -> Tensor:
        """``[batch, new]`` token ids at positions ``start ...`` -> ``[batch, new, dim]``."""
        end = start + input_ids.shape[1]
        if end > self.max_positions:
            raise VlkitError(f"text of {end} tokens is longer than the decoder's {self.max_positions} positions")
        x = self.word_embed(input_ids) + (self.pos_embed.weight[start:end] + self.type_embed)
        return self.embed_drop(self.embed_norm(x))

    def logits(self, hidden: Tensor) -> Tensor:
        """Hidden states ``[..., dim]`` -> logits ``[..., vocab]`` (the output projection is the word embeddings).

        Without gradients the projection multiplies by a transposed, contiguous copy of the embeddings
        ``[dim, vocab]``, kept until the weights change: for the few rows of a decoding step this is several times
        faster on CPU than ``F.linear`` on the ``[vocab, dim]`` table.
        """
        h = self.head(hidden)
        weight = self.word_embed.weight
        if torch.is_grad_enabled() and (weight.requires_grad or h.requires_grad):
            return F.linear(h, weight, self.lm_bias)
        flat = torch.addmm(self.lm_bias, h.reshape(-1, self.dim), self._output_table())  # [rows, vocab]
        return flat.view(*h.shape[:-1], self.vocab_size)

    def _output_table(self) -> Tensor:
        """The word embeddings transposed, ``[dim, vocab]``, rebuilt when they change (in place or moved)."""
        weight = self.word_embed.weight
        key = (weight.data_ptr(), weight._version, weight.device, weight.dtype)
        if getattr(self, "_table_key", None) != key:
            with torch.inference_mode(False), torch.no_grad():
                self._table = weight.detach().t().contiguous()
            self._table_key = key
        return self._table

    def forward_features(self, input_ids: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None,
                         attention_mask: Tensor | None = None) -> Tensor:
        """Last hidden states ``[batch, length, dim]`` of a whole sequence (teacher forcing).

        Args:
            input_ids: ``[batch, length]``, starting with the start token.
            context: ``[batch, context, context_dim]`` image tokens (None without cross-attention).
            context_mask: ``[batch, context]`` True on real context tokens (None: all real).
            attention_mask: ``[batch, length]`` 1 on tokens, 0 on padding (None: no padding).
        """
        if self.context_dim is not None and context is None:
            raise VlkitError("the decoder cross-attends to image tokens: give a context")
        attn_mask = _self_attention_mask(attention_mask)
        x = self.embed(input_ids)  # [batch, length, dim]
        for layer in self.layers:
            x = layer(x, context, context_mask, attn_mask=attn_mask, is_causal=attn_mask is None)
        return x

    def forward(self, input_ids: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None,
                attention_mask: Tensor | None = None) -> Tensor:
        """Teacher forcing: logits ``[batch, length, vocab]``, position ``t`` predicting token ``t + 1``
        (arguments as :meth:`forward_features`)."""
        return self.logits(self.forward_features(input_ids, context, context_mask, attention_mask))

    # ----------------------------------------------------------------- incremental decoding
    def start(self, context: Tensor | None, context_mask: Tensor | None = None, max_length: int | None = None
              ) -> DecoderCache:
        """A cache for decoding up to ``max_length`` tokens (default: every position) over ``context``
        ``[batch, context, context_dim]``: the cross-attention keys/values are computed here, once."""
        max_length = self.max_positions if max_length is None else max_length
        if max_length > self.max_positions:
            raise VlkitError(f"max_length {max_length} exceeds the decoder's {self.max_positions} positions")
        if self.context_dim is not None and context is None:
            raise VlkitError("the decoder cross-attends to image tokens: give a context")
        ref = self.word_embed.weight
        batch = context.shape[0] if context is not None else 1
        cross = [layer.cross_attn.context_kv(context) for layer in self.layers] if self.context_dim else []
        self_kv = DecoderCache.new_self_kv(self.num_layers, batch, self.num_heads, max_length,
                                           self.dim // self.num_heads, ref.device, ref.dtype)
        return DecoderCache(self_kv=self_kv, cross_kv=cross, context_mask=context_mask)

    def step(self, input_ids: Tensor, cache: DecoderCache) -> Tensor:
        """Run the tokens ``[batch, new]`` that follow those in ``cache``, append their keys/values and return
        their logits ``[batch, new, vocab]``. One new token sees every cached key, so its self-attention runs
        with no mask at all."""
        new = input_ids.shape[1]
        x = self.embed(input_ids, cache.length)  # [batch, new, dim]
        for i, layer in enumerate(self.layers):
            cross_kv = cache.cross_kv[i] if cache.cross_kv else None
            x = layer(x, None, cache.context_mask, is_causal=new > 1, kv_cache=cache.self_kv[i], cross_kv=cross_kv)
        return self.logits(x)

    # ----------------------------------------------------------------- pretrained weights
    @classmethod
    def from_hf_bert(cls, path: str | Path, cross_attention: bool = True, context_dim: int | None = None,
                     max_positions: int | None = None, dropout: float = 0.0) -> "BertTextDecoder":
        """A decoder started from a local BERT directory (``config.json`` and ``model.safetensors``).

        Embeddings, self-attention and feed-forward layers are copied (query/key/value concatenated into the
        fused projection); cross-attention and the head's transform start random unless the checkpoint has
        them (a ``BertLMHeadModel`` with cross-attention does). The output projection is the word embeddings.

        Args:
            path: the directory (``vlkit.modules.encoders.hf_text.resolve_text_encoder_path("minilm")``).
            cross_attention: add cross-attention layers.
            context_dim: width of the context tokens (default the BERT width).
            max_positions: keep only the first positions (default all of the checkpoint's).
            dropout: dropout while training.

        Raises:
            VlkitError: not a BERT directory, or a weight missing or of the wrong shape (named).
        """
        path = Path(path)
        config = json.loads((path / "config.json").read_text())
        if config.get("model_type") != "bert":
            raise VlkitError(f"{path}: a BERT checkpoint is needed, found model_type {config.get('model_type')!r}")
        positions = config["max_position_embeddings"]
        model = cls(config["vocab_size"], config["hidden_size"], config["num_hidden_layers"],
                    config["num_attention_heads"], config["intermediate_size"], min(max_positions or positions,
                                                                                    positions),
                    context_dim, cross_attention, config.get("hidden_act", "gelu"), config.get("layer_norm_eps", 1e-12),
                    dropout)
        state = _read_weights(path)
        own = from_hf_bert_state_dict(state, model.num_layers, model.max_positions, cross_attention)
        expected = model.state_dict()
        problems = [f"{k}: {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in own.items()
                    if k in expected and v.shape != expected[k].shape]
        if problems:
            raise VlkitError(f"{path}: weights do not fit the decoder: {problems[:5]}")
        missing = model.load_state_dict(own, strict=False).missing_keys
        required = [k for k in missing if not _starts_random(k)]
        if required:
            raise VlkitError(f"{path}: missing BERT weights for {required[:10]}")
        return model


def _starts_random(name: str) -> bool:
    """Parts an encoder checkpoint does not have: cross-attention and the LM head."""
    return ".cross_attn." in name or ".ln_cross." in name or name.startswith(("head.", "lm_bias"))


def _self_attention_mask(attention_mask: Tensor | None) -> Tensor | None:
    """Causal AND key padding, ``[batch, length, length]`` boolean, or None when nothing is padded (then the
    fast causal path runs). Each query also sees itself, so a padding row never attends to nothing."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    length = attention_mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
    eye = torch.eye(length, dtype=torch.bool, device=attention_mask.device)
    return (causal & attention_mask.bool()[:, None, :]) | eye  # [batch, length, length]


def _read_weights(path: Path) -> dict[str, Tensor]:
    if (path / "model.safetensors").exists():
        from safetensors.torch import load_file

        return load_file(str(path / "model.safetensors"))
    if (path / "pytorch_model.bin").exists():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise VlkitError(f"{path}: no model.safetensors or pytorch_model.bin")


# BERT name -> vlkit name inside one layer (the q/k/v projections are handled apart)
_LAYER_MAP = {
    "attention.output.dense": "self_attn.out_proj",
    "attention.output.LayerNorm": "ln_self",
    "crossattention.self.query": "cross_attn.q_proj",
    "crossattention.output.dense": "cross_attn.out_proj",
    "crossattention.output.LayerNorm": "ln_cross",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "output.LayerNorm": "ln_mlp",
}


def from_hf_bert_state_dict(state: dict[str, Tensor], num_layers: int, max_positions: int,
                            cross_attention: bool = True) -> dict[str, Tensor]:
    """A BERT state dict (``BertModel`` or ``BertLMHeadModel`` names, with or without the ``bert.`` prefix) under
    :class:`BertTextDecoder` names. Keys the checkpoint lacks (cross-attention, LM head) are left out."""
    prefix = "bert." if any(k.startswith("bert.") for k in state) else ""
    get = lambda name: state[prefix + name]  # noqa: E731
    out = {
        "word_embed.weight": get("embeddings.word_embeddings.weight"),
        "pos_embed.weight": get("embeddings.position_embeddings.weight")[:max_positions],
        "type_embed": get("embeddings.token_type_embeddings.weight")[0],
        "embed_norm.weight": get("embeddings.LayerNorm.weight"),
        "embed_norm.bias": get("embeddings.LayerNorm.bias"),
    }
    for i in range(num_layers):
        src, dst = f"encoder.layer.{i}.", f"layers.{i}."
        for kind in ("weight", "bias"):
            qkv = [get(f"{src}attention.self.{n}.{kind}") for n in ("query", "key", "value")]
            out[f"{dst}self_attn.in_proj.{kind}"] = torch.cat(qkv, dim=0)
            if cross_attention and prefix + f"{src}crossattention.self.key.{kind}" in state:
                kv = [get(f"{src}crossattention.self.{n}.{kind}") for n in ("key", "value")]
                out[f"{dst}cross_attn.kv_proj.{kind}"] = torch.cat(kv, dim=0)
            for bert_name, own_name in _LAYER_MAP.items():
                if bert_name.startswith("crossattention") and not cross_attention:
                    continue
                if prefix + f"{src}{bert_name}.{kind}" in state:
                    out[f"{dst}{own_name}.{kind}"] = get(f"{src}{bert_name}.{kind}")
    for kind in ("weight", "bias"):
        for bert_name, own_name in (("transform.dense", "head.dense"), ("transform.LayerNorm", "head.norm")):
            if f"cls.predictions.{bert_name}.{kind}" in state:
                out[f"{own_name}.{kind}"] = state[f"cls.predictions.{bert_name}.{kind}"]
    if "cls.predictions.bias" in state:
        out["lm_bias"] = state["cls.predictions.bias"]
    return out


def to_hf_bert_state_dict(decoder: BertTextDecoder) -> dict[str, Tensor]:
    """The decoder's weights under ``transformers.BertLMHeadModel`` names (config from :func:`hf_bert_config`)."""
    own = {k: v.detach() for k, v in decoder.state_dict().items()}
    d = decoder.dim
    out = {
        "bert.embeddings.word_embeddings.weight": own["word_embed.weight"],
        "bert.embeddings.position_embeddings.weight": own["pos_embed.weight"],
        "bert.embeddings.token_type_embeddings.weight": own["type_embed"][None],  # [1, dim]
        "bert.embeddings.LayerNorm.weight": own["embed_norm.weight"],
        "bert.embeddings.LayerNorm.bias": own["embed_norm.bias"],
        "cls.predictions.transform.dense.weight": own["head.dense.weight"],
        "cls.predictions.transform.dense.bias": own["head.dense.bias"],
        "cls.predictions.transform.LayerNorm.weight": own["head.norm.weight"],
        "cls.predictions.transform.LayerNorm.bias": own["head.norm.bias"],
        "cls.predictions.bias": own["lm_bias"],
        "cls.predictions.decoder.weight": own["word_embed.weight"],
        "cls.predictions.decoder.bias": own["lm_bias"],
    }
    for i in range(decoder.num_layers):
        src, dst = f"layers.{i}.", f"bert.encoder.layer.{i}."
        for kind in ("weight", "bias"):
            for n, t in zip(("query", "key", "value"), own[f"{src}self_attn.in_proj.{kind}"].split(d, dim=0)):
                out[f"{dst}attention.self.{n}.{kind}"] = t
            if decoder.context_dim is not None:
                out[f"{dst}crossattention.self.query.{kind}"] = own[f"{src}cross_attn.q_proj.{kind}"]
                for n, t in zip(("key", "value"), own[f"{src}cross_attn.kv_proj.{kind}"].split(d, dim=0)):
                    out[f"{dst}crossattention.self.{n}.{kind}"] = t
            for bert_name, own_name in _LAYER_MAP.items():
                if bert_name.startswith("crossattention") and decoder.context_dim is None:
                    continue
                out[f"{dst}{bert_name}.{kind}"] = own[f"{src}{own_name}.{kind}"]
    return {k: v.clone() for k, v in out.items()}


def hf_bert_config(decoder: BertTextDecoder, **overrides):
    """A ``transformers.BertConfig`` of a ``BertLMHeadModel`` with the decoder's shape (one token type).

    Raises:
        VlkitError: the context width differs from the decoder width (BERT's cross-attention needs them equal).
    """
    from transformers import BertConfig

    if decoder.context_dim not in (None, decoder.dim):
        raise VlkitError(f"BertLMHeadModel cross-attends to {decoder.dim}-wide states, the decoder to "
                         f"{decoder.context_dim}-wide ones")
    fields = dict(vocab_size=decoder.vocab_size, hidden_size=decoder.dim, num_hidden_layers=decoder.num_layers,
                  num_attention_heads=decoder.num_heads, intermediate_size=decoder.mlp_dim,
                  max_position_embeddings=decoder.max_positions, type_vocab_size=1, hidden_act=decoder.act,
                  layer_norm_eps=decoder.norm_eps, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                  is_decoder=True, add_cross_attention=decoder.context_dim is not None, tie_word_embeddings=True)
    return BertConfig(**{**fields, **overrides})
