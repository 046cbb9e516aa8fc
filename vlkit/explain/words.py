"""How much each word of a text adds to its match with an image: gradient x input on the token embeddings."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor, nn

from vlkit.errors import VlkitError


@dataclass
class WordWeight:
    """One token of the text and its contribution to the image-text similarity.

    Attributes:
        token: the token as the tokenizer spells it (``##`` pieces and ``</w>`` marks included).
        weight: gradient x input summed over the embedding: positive where the token raises the similarity.
    """

    token: str
    weight: float


def token_embedding(model: nn.Module) -> nn.Embedding:
    """The token embedding of ``model``'s text tower: its largest ``nn.Embedding`` (position and type
    embeddings are smaller than a vocabulary).

    Raises:
        VlkitError: the model names no text tower, or it has no embedding.
    """
    prefixes = getattr(model, "LR_GROUPS", {}).get("text") or ()
    for prefix in prefixes:
        with contextlib.suppress(AttributeError):
            tower = model.get_submodule(prefix.rstrip("."))
            embeddings = [m for m in tower.modules() if isinstance(m, nn.Embedding)]
            if embeddings:
                return max(embeddings, key=lambda m: m.num_embeddings)
    raise VlkitError(f"a {type(model).__name__} has no text tower with a token embedding")


@contextlib.contextmanager
def tap_token_embeddings(model: nn.Module) -> Iterator[dict[str, Tensor]]:
    """Record the token embeddings ``[batch, length, width]`` of the text tower (kept in the autograd graph)
    while the block runs; yields ``{"value": tensor}``, filled by the forward pass."""
    found: dict[str, Tensor] = {}

    def keep(module, args, output):
        if torch.is_grad_enabled() and not output.requires_grad:  # frozen weights: make the output a leaf
            output = output.detach().requires_grad_(True)
        found["value"] = output
        return output

    handle = token_embedding(model).register_forward_hook(keep)
    try:
        yield found
    finally:
        handle.remove()


def word_weights(embeddings: Tensor, gradient: Tensor, input_ids: Tensor, attention_mask: Tensor | None,
                 tokenizer) -> list[WordWeight]:
    """Gradient x input of each real token of the first text of a batch (special and padding tokens left out).

    Args:
        embeddings: the token embeddings ``[batch, length, width]``.
        gradient: the gradient of the similarity with respect to them, ``[batch, length, width]``.
        input_ids: ``[batch, length]``.
        attention_mask: ``[batch, length]`` or None.
        tokenizer: the model's tokenizer (a :class:`~vlkit.data.text.TextTokenizer`).
    """
    scores = (gradient[0] * embeddings[0]).sum(-1)  # [length]
    out = []
    for pos, token_id in enumerate(input_ids[0].tolist()):
        if attention_mask is not None and not attention_mask[0, pos]:
            continue
        if not tokenizer.decode([token_id]).strip():  # a special token ([CLS], <eos>, padding)
            continue
        inner = getattr(tokenizer, "tokenizer", None)
        spelled = inner.id_to_token(token_id) if inner is not None else tokenizer.decode([token_id])
        out.append(WordWeight(spelled or tokenizer.decode([token_id]), float(scores[pos])))
    return out
