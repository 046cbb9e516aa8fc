"""The matching interface of a model with an image-text matching (ITM) head.

Re-ranking (``vlkit eval --rerank K``, ``vlkit search --rerank K``), CapFilt's filter and retrieval by a
fusion-only model score (image, text) pairs with a model's ITM head. A model joins by exposing two methods (by
composition, not inheritance):

- ``match_features(images) -> Tensor``: the image side of matching, computed once per image ``[batch, ...]``
  (an ALBEF's or BLIP's normalised image tokens, a BLIP-2's query outputs' inputs, a ViLT's patch embeddings);
  rows can be indexed, repeated and concatenated along the first dimension.
- ``match_scores(features, input_ids, attention_mask) -> Tensor``: the probability ``[batch]`` that the image
  of feature row ``i`` matches text ``i`` (the ITM head's softmax, class 1).

The scores of a pair do not depend on the other rows of the batch, so candidates can be scored in any grouping.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor, nn

from vlkit.errors import VlkitError
from vlkit.inference.interface import _unwrap


@runtime_checkable
class Matching(Protocol):
    """A model that scores image-text pairs (see the module docstring)."""

    def match_features(self, images: Tensor) -> Tensor: ...

    def match_scores(self, features: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor: ...


def can_match(model: nn.Module) -> bool:
    """True when ``model`` (unwrapped) has an image-text matching head it can score pairs with."""
    inner = _unwrap(model)
    return all(callable(getattr(inner, name, None)) for name in ("match_features", "match_scores"))


def require_matching(model: nn.Module, what: str = "re-ranking") -> nn.Module:
    """The unwrapped model, or a clear error when it has no matching head.

    Args:
        what: what needs the head, for the message.
    """
    inner = _unwrap(model)
    if not can_match(inner):
        raise VlkitError(f"{type(inner).__name__} has no image-text matching head: {what} needs a fusion model "
                         "(albef-*, blip-*, blip2-*, vlmo-*, vilt-*)")
    return inner
