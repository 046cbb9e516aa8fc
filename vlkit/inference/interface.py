"""The decoding interface of a model with a text decoder.

:func:`vlkit.inference.generate.generate` works with any model that exposes these (by composition, not
inheritance):

- ``generation`` (property): a :class:`GenerationSpec` (start, end and pad token ids, most tokens).
- ``start_decoding(images, max_length) -> DecoderCache``: encode the images once and return a cache holding
  the cross-attention keys/values over their tokens and empty self-attention caches for ``max_length`` tokens.
- ``decode_step(input_ids, cache) -> logits``: run ``input_ids`` ``[batch, new]`` (the tokens after those the
  cache holds), append their keys/values to the cache and return next-token logits ``[batch, new, vocab]``.
- ``caption_logits(images, input_ids, attention_mask) -> logits``: teacher forcing over whole sequences,
  ``[batch, length, vocab]``, position ``t`` predicting token ``t + 1`` (what training and the uncached
  reference compute); equal to stepping through the sequence with :meth:`decode_step`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from torch import Tensor, nn

from vlkit.errors import VlkitError
from vlkit.modules.layers.decoder_cache import DecoderCache
from vlkit.train.distributed import unwrap as _unwrap


@dataclass(frozen=True)
class GenerationSpec:
    """Token ids and limits of a model's text decoder.

    Attributes:
        bos_token_id: the token every sequence starts with ([CLS] for BERT vocabularies, <start_of_text> for CLIP).
        eos_token_id: the token that ends a sequence ([SEP], <end_of_text>).
        pad_token_id: fills finished sequences.
        max_length: most tokens the decoder holds (its positional embeddings), the start token included.
        vocab_size: size of the logits.
    """

    bos_token_id: int
    eos_token_id: int
    pad_token_id: int
    max_length: int
    vocab_size: int


@runtime_checkable
class Generative(Protocol):
    """A model that can write text about images (see the module docstring)."""

    @property
    def generation(self) -> GenerationSpec: ...

    def start_decoding(self, images: Tensor, max_length: int) -> DecoderCache: ...

    def decode_step(self, input_ids: Tensor, cache: DecoderCache) -> Tensor: ...

    def caption_logits(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor: ...


def is_generative(model: nn.Module) -> bool:
    """True when ``model`` (unwrapped) has a text decoder it can generate with."""
    inner = _unwrap(model)
    return all(callable(getattr(inner, name, None)) for name in ("start_decoding", "decode_step", "caption_logits")) \
        and getattr(inner, "generation", None) is not None


def require_generative(model: nn.Module) -> nn.Module:
    """The unwrapped model, or a clear error when it cannot generate text."""
    inner = _unwrap(model)
    if not is_generative(inner):
        raise VlkitError(f"{type(inner).__name__} has no text decoder: captioning needs a generative model "
                         "(coca-*, captioner-*, blip-*, blip2-* at stage 2)")
    return inner
