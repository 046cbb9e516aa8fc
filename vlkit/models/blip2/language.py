"""BLIP-2's stage-2 language models: a decoder conditioned on the Q-Former's query outputs, projected by a linear
layer to its width.

- :class:`BertLanguageModel`: a BERT-shaped decoder (:class:`~vlkit.modules.decoders.bert_decoder.BertTextDecoder`)
  whose cross-attention reads the projected queries. Started from a local BERT (``minilm``), its pretrained parts
  stay frozen (its new cross-attention, head transform and output bias train); ``bert`` builds a random one that
  trains whole (tests, tiny models).
- :class:`CausalLanguageModel`: a local Hugging Face causal LM (GPT-2, OPT, ...), frozen entirely, reading the
  projected queries as a soft prompt before the text (BLIP-2's decoder-only route). Decoding runs the prompt and
  the tokens so far again at every step (the tokens are kept in :attr:`DecoderCache.extra`).

Both give teacher-forced logits aligned with the text (position ``t`` predicts token ``t + 1``), a
:class:`~vlkit.modules.layers.decoder_cache.DecoderCache` to decode with, and their token ids.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlkit.errors import VlkitError
from vlkit.inference.interface import GenerationSpec
from vlkit.modules.decoders.bert_decoder import BertTextDecoder
from vlkit.modules.encoders.hf_text import resolve_text_encoder_path
from vlkit.modules.layers.attention import KVCache
from vlkit.modules.layers.decoder_cache import DecoderCache


def language_model_kind(name: str) -> str:
    """``bert`` (random), ``hf_bert`` (a local BERT directory or ``minilm``) or ``causal`` (any other local
    Hugging Face model directory) for a ``language_model`` setting."""
    if name == "bert":
        return "bert"
    path = resolve_text_encoder_path(name)
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    return "hf_bert" if model_type == "bert" else "causal"


class BertLanguageModel(nn.Module):
    """A BERT decoder cross-attending to the projected queries (see the module docstring).

    Args:
        name: ``bert`` (random, of the ``decoder_*`` sizes) or ``minilm`` / a local BERT directory.
        query_width: width of the Q-Former's outputs.
        sizes: ``vocab_size``, ``decoder_width``, ``decoder_layers``, ``decoder_heads``, ``decoder_mlp_dim``,
            ``max_positions``, ``dropout`` (the random decoder's; ``max_positions`` also cuts a pretrained one).
        load_weights: load the pretrained decoder's weights (False: its shape only, weights loaded later).
    """

    def __init__(self, name: str, query_width: int, sizes: dict, load_weights: bool = True):
        super().__init__()
        self.pretrained = name != "bert"
        if not self.pretrained:
            self.decoder = BertTextDecoder(sizes["vocab_size"], sizes["decoder_width"], sizes["decoder_layers"],
                                           sizes["decoder_heads"], sizes["decoder_mlp_dim"], sizes["max_positions"],
                                           dropout=sizes["dropout"])
        elif load_weights:
            self.decoder = BertTextDecoder.from_hf_bert(resolve_text_encoder_path(name),
                                                        max_positions=sizes["max_positions"])
        else:
            hf = json.loads((resolve_text_encoder_path(name) / "config.json").read_text())
            self.decoder = BertTextDecoder(hf["vocab_size"], hf["hidden_size"], hf["num_hidden_layers"],
                                           hf["num_attention_heads"], hf["intermediate_size"],
                                           min(sizes["max_positions"], hf["max_position_embeddings"]),
                                           act=hf.get("hidden_act", "gelu"), norm_eps=hf.get("layer_norm_eps", 1e-12))
        self.proj = nn.Linear(query_width, self.decoder.dim)
        if self.pretrained:
            for name_, param in self.decoder.named_parameters():
                new = ".cross_attn." in name_ or ".ln_cross." in name_ or name_.startswith(("head.", "lm_bias"))
                param.requires_grad_(new)

    @property
    def vocab_size(self) -> int:
        return self.decoder.vocab_size

    @property
    def max_length(self) -> int:
        return self.decoder.max_positions

    def logits(self, queries: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """``queries`` [batch, Q, query_width], text ``[batch, L]`` -> logits ``[batch, L, vocab]``."""
        return self.decoder(input_ids, self.proj(queries), None, attention_mask)

    def start(self, queries: Tensor, max_length: int) -> DecoderCache:
        return self.decoder.start(self.proj(queries), None, max_length)

    def step(self, input_ids: Tensor, cache: DecoderCache) -> Tensor:
        return self.decoder.step(input_ids, cache)


class CausalLanguageModel(nn.Module):
    """A frozen Hugging Face causal LM reading the projected queries as a soft prompt (module docstring).

    The base model and the output projection are kept apart (``lm`` and, when it is not tied to the input
    embeddings, ``head``) so that every weight has one name in a saved model.

    Args:
        path: a local model directory (``config.json``, weights, ``tokenizer.json``).
        query_width: width of the Q-Former's outputs.
        num_queries: soft-prompt length.
        max_positions: most text tokens (also limited by the LM's positions less the queries).
        load_weights: load the LM's weights (False: its shape only, weights loaded later).
    """

    def __init__(self, path: str, query_width: int, num_queries: int, max_positions: int, load_weights: bool = True):
        super().__init__()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        directory = resolve_text_encoder_path(path)
        if load_weights:
            full = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)
        else:
            full = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory, local_files_only=True))
        cfg = full.config
        out, inp = full.get_output_embeddings(), full.get_input_embeddings()
        self.lm = full.base_model
        self.head = None if out is None or out.weight is inp.weight else out
        self.proj = nn.Linear(query_width, cfg.hidden_size)
        self.num_queries = num_queries
        self.vocab_size = out.weight.shape[0] if out is not None else inp.weight.shape[0]
        positions = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048
        self.max_length = min(max_positions, positions - num_queries)
        eos = cfg.eos_token_id if not isinstance(cfg.eos_token_id, list) else cfg.eos_token_id[0]
        bos = cfg.bos_token_id if cfg.bos_token_id is not None else eos
        if bos is None or eos is None:
            raise VlkitError(f"{directory}: the language model's config names no bos/eos token id")
        self.bos_token_id, self.eos_token_id = int(bos), int(eos)
        self.pad_token_id = int(cfg.pad_token_id) if cfg.pad_token_id is not None else self.eos_token_id
        self.lm.requires_grad_(False)
        if self.head is not None:
            self.head.requires_grad_(False)
        self.lm.eval()

    def train(self, mode: bool = True) -> "CausalLanguageModel":
        """The frozen LM stays in eval mode (no dropout); the projection follows ``mode``."""
        super().train(mode)
        self.lm.eval()
        return self

    def _output(self, hidden: Tensor) -> Tensor:
        if self.head is not None:
            return self.head(hidden)
        return F.linear(hidden, self.lm.get_input_embeddings().weight)

    def _run(self, prefix: Tensor, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        """Soft prompt ``[batch, Q, hidden]`` then the text ``[batch, L]`` -> text logits ``[batch, L, vocab]``."""
        text = self.lm.get_input_embeddings()(input_ids)  # [batch, L, hidden]
        x = torch.cat([prefix.to(text.dtype), text], dim=1)
        mask = torch.ones(x.shape[:2], dtype=torch.long, device=x.device)
        if attention_mask is not None:
            mask[:, prefix.shape[1]:] = attention_mask
        hidden = self.lm(inputs_embeds=x, attention_mask=mask).last_hidden_state  # [batch, Q + L, hidden]
        return self._output(hidden[:, prefix.shape[1]:])

    def logits(self, queries: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """``queries`` [batch, Q, query_width], text ``[batch, L]`` -> logits ``[batch, L, vocab]``."""
        if input_ids.shape[1] > self.max_length:
            raise VlkitError(f"text of {input_ids.shape[1]} tokens is longer than the {self.max_length} the "
                             "language model holds after the queries")
        return self._run(self.proj(queries), input_ids, attention_mask)

    def start(self, queries: Tensor, max_length: int) -> DecoderCache:
        """A cache holding the soft prompt and room for ``max_length`` tokens (a counter stands in for the
        self-attention cache: each step runs the whole prefix again)."""
        if max_length > self.max_length:
            raise VlkitError(f"max_length {max_length} exceeds the {self.max_length} tokens the language model "
                             "holds after the queries")
        prefix = self.proj(queries)  # [batch, Q, hidden]
        batch = prefix.shape[0]
        counter = KVCache.empty(batch, 1, max_length, 0, prefix.device, prefix.dtype)
        tokens = torch.zeros(batch, max_length, dtype=torch.long, device=prefix.device)
        return DecoderCache(self_kv=[counter], extra={"prefix": prefix, "tokens": tokens})

    def step(self, input_ids: Tensor, cache: DecoderCache) -> Tensor:
        """Logits ``[batch, new, vocab]`` of the tokens ``[batch, new]`` after those the cache holds."""
        start, new = cache.length, input_ids.shape[1]
        counter = cache.self_kv[0]
        empty = counter.keys.new_zeros(input_ids.shape[0], 1, new, 0)
        counter.append(empty, empty)
        cache.extra["tokens"][:, start:start + new] = input_ids
        return self._run(cache.extra["prefix"], cache.extra["tokens"][:, :start + new], None)[:, start:]


def build_language_model(name: str, query_width: int, num_queries: int, sizes: dict,
                         load_weights: bool = True) -> BertLanguageModel | CausalLanguageModel:
    """The stage-2 language model a ``language_model`` setting names (see the module docstring)."""
    kind = language_model_kind(name)
    if kind == "causal":
        return CausalLanguageModel(name, query_width, num_queries, sizes["max_positions"], load_weights)
    return BertLanguageModel(name, query_width, sizes, load_weights)


def lm_spec(language: BertLanguageModel | CausalLanguageModel, bos: int, eos: int, pad: int) -> GenerationSpec:
    """The generation spec of a language model (a BERT decoder uses the Q-Former's text ids ``bos``, ``eos``,
    ``pad``; a causal LM its own)."""
    if isinstance(language, CausalLanguageModel):
        bos, eos, pad = language.bos_token_id, language.eos_token_id, language.pad_token_id
    return GenerationSpec(bos, eos, pad, language.max_length, language.vocab_size)


__all__ = ["BertLanguageModel", "CausalLanguageModel", "build_language_model", "language_model_kind", "lm_spec"]
