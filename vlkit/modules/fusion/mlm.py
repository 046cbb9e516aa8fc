"""Masked language modelling (MLM) with whole-word masking (BERT, Devlin et al. 2019).

Each word is chosen with probability ``prob`` (15%); when a word is chosen, all of its sub-word tokens are
predicted. Of the chosen tokens 80% are replaced by the mask token, 10% by a random token and 10% are left
unchanged (the choice is made per token). Padding and special tokens are never chosen.

Which tokens form a word is given by ``word_ids`` ``[batch, length]``: tokens with the same non-negative id in
a row form one word, negative ids are never masked. :func:`word_ids_from_encodings` reads them from
``tokenizers`` encodings (sub-word tokenizers such as WordPiece); :func:`word_ids_per_token` makes every
non-special token its own word (word-level tokenizers such as :func:`vlkit.data.text.build_word_tokenizer`,
which is also what :func:`mask_tokens` assumes when no ``word_ids`` are given).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from vlkit.modules.fusion.distill import distilled_cross_entropy
from vlkit.modules.layers.mlp import activation

IGNORE_INDEX = -100


@dataclass
class MaskedTokens:
    """A masked batch.

    Attributes:
        input_ids: the ids with the chosen tokens replaced, ``[batch, length]``.
        labels: the original id where a token is to be predicted, ``-100`` elsewhere, ``[batch, length]``.
    """

    input_ids: Tensor
    labels: Tensor


def _maskable(input_ids: Tensor, attention_mask: Tensor | None, special_ids: Sequence[int]) -> Tensor:
    """``[batch, length]`` True on real, non-special tokens."""
    ok = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if len(special_ids):
        ok &= ~torch.isin(input_ids, torch.tensor(list(special_ids), device=input_ids.device))
    return ok


def word_ids_per_token(input_ids: Tensor, attention_mask: Tensor | None = None,
                       special_ids: Sequence[int] = ()) -> Tensor:
    """Word ids where every real, non-special token is a word of its own (word-level tokenizers).

    Returns:
        ``[batch, length]`` long: the position for maskable tokens, -1 for padding and special tokens.
    """
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    return torch.where(_maskable(input_ids, attention_mask, special_ids), positions, -1)


def word_ids_from_encodings(encodings: Sequence, length: int | None = None) -> Tensor:
    """Word ids from ``tokenizers.Encoding`` objects (their ``word_ids``; special tokens have none).

    Args:
        encodings: one encoding per text, e.g. ``TextTokenizer.tokenizer.encode_batch(texts)``.
        length: pad (with -1) or cut to this many positions (default: the longest encoding).

    Returns:
        ``[batch, length]`` long, -1 on special tokens and padding.
    """
    rows = [[-1 if w is None else w for w in enc.word_ids] for enc in encodings]
    length = max((len(r) for r in rows), default=0) if length is None else length
    out = torch.full((len(rows), length), -1, dtype=torch.long)
    for i, row in enumerate(rows):
        row = row[:length]
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def mask_tokens(
    input_ids: Tensor,
    attention_mask: Tensor | None,
    word_ids: Tensor | None = None,
    mask_token_id: int = 103,
    vocab_size: int = 30522,
    prob: float = 0.15,
    generator: torch.Generator | None = None,
    special_ids: Sequence[int] = (),
) -> MaskedTokens:
    """Whole-word masking with BERT's 80/10/10 replacement.

    Args:
        input_ids: ``[batch, length]``.
        attention_mask: ``[batch, length]``, 1 on real tokens (padding is never masked); None: all real.
        word_ids: which tokens form a word: a long tensor ``[batch, length]`` (same non-negative id = one word,
            negative = never masked), or a boolean word-start mask (True on the first token of each word; a
            token belongs to the word of the last start before it, tokens before the first start are never
            masked). None: each token is its own word.
        mask_token_id: the id that replaces 80% of the chosen tokens.
        vocab_size: random replacements are drawn uniformly from ``[0, vocab_size)``.
        prob: probability of choosing each word.
        generator: random generator (on the device of ``input_ids``).
        special_ids: ids never masked whatever ``word_ids`` says ([CLS], [SEP], [PAD], ...).

    Returns:
        :class:`MaskedTokens`.
    """
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"prob must be in [0, 1], got {prob}")
    batch, length = input_ids.shape
    device = input_ids.device
    maskable = _maskable(input_ids, attention_mask, special_ids)  # [batch, length]
    if word_ids is None:
        words = torch.arange(length, device=device).expand(batch, length)
    elif word_ids.dtype == torch.bool:
        words = word_ids.long().cumsum(dim=1) - 1  # continuation tokens join the preceding start
    else:
        words = word_ids.to(device=device, dtype=torch.long)
    if words.shape != input_ids.shape:
        raise ValueError(f"word_ids {tuple(words.shape)} do not match input_ids {tuple(input_ids.shape)}")
    maskable &= words >= 0
    words = words.clamp(min=0)
    n_words = max(length, int(words.max()) + 1 if words.numel() else 1)  # ids never exceed it in practice
    word_chosen = torch.rand(batch, n_words, generator=generator, device=device) < prob  # [batch, words]
    chosen = word_chosen.gather(1, words) & maskable  # [batch, length]
    labels = torch.where(chosen, input_ids, IGNORE_INDEX)
    r = torch.rand(batch, length, generator=generator, device=device)
    random_ids = torch.randint(vocab_size, (batch, length), generator=generator, device=device,
                               dtype=input_ids.dtype)
    masked = torch.where(chosen & (r < 0.8), torch.full_like(input_ids, mask_token_id), input_ids)
    masked = torch.where(chosen & (r >= 0.8) & (r < 0.9), random_ids, masked)
    return MaskedTokens(input_ids=masked, labels=labels)


class MLMHead(nn.Module):
    """BERT's prediction head: dense -> GELU -> LayerNorm -> decoder to the vocabulary.

    The decoder weight can be tied to the word embeddings (``tied=True``): the head then keeps only the
    decoder bias and takes the embedding matrix as an argument, so the tie survives saving (no parameter is
    shared between modules) and a momentum copy of the model ties to the momentum embeddings.

    Args:
        dim: width of the token features.
        vocab_size: number of token ids.
        act: activation name.
        norm_eps: LayerNorm epsilon.
        tied: use the word embeddings passed to :meth:`forward` as the decoder weight.
    """

    def __init__(self, dim: int, vocab_size: int, act: str = "gelu", norm_eps: float = 1e-6, tied: bool = True):
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.act = activation(act)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.decoder_weight = None if tied else nn.Parameter(torch.randn(vocab_size, dim) * 0.02)
        self.decoder_bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, x: Tensor, word_embeddings: Tensor | None = None) -> Tensor:
        """``[..., dim]`` -> logits ``[..., vocab_size]``; ``word_embeddings`` ``[vocab_size, dim]`` when tied."""
        weight = self.decoder_weight if self.decoder_weight is not None else word_embeddings
        if weight is None:
            raise ValueError("a tied MLM head needs the word embeddings")
        return nn.functional.linear(self.norm(self.act(self.dense(x))), weight, self.decoder_bias)


@dataclass
class MLMOutput:
    """What :func:`mlm_loss` returns.

    Attributes:
        loss: mean cross-entropy over the predicted tokens (0 when there are none), a scalar.
        accuracy: fraction of predicted tokens whose argmax is right (no gradient).
        num_predicted: number of predicted tokens.
    """

    loss: Tensor
    accuracy: Tensor
    num_predicted: int


def mlm_loss(logits: Tensor, labels: Tensor, teacher_logits: Tensor | None = None, alpha: float = 0.0) -> MLMOutput:
    """Cross-entropy of the predicted tokens, optionally distilled from a teacher (see
    :func:`vlkit.modules.fusion.distill.distilled_cross_entropy`).

    Args:
        logits: ``[..., vocab]`` for every position, or ``[n, vocab]`` for the predicted positions only
            (then ``labels`` is ``[n]``).
        labels: token ids ``[...]``, ``-100`` where nothing is predicted.
        teacher_logits: the teacher's logits at the same positions as ``logits``.
        alpha: distillation weight.
    """
    labels = labels.reshape(-1)
    logits = logits.reshape(-1, logits.shape[-1])
    keep = labels != IGNORE_INDEX
    if logits.shape[0] == labels.shape[0]:
        logits = logits[keep]
        teacher_logits = None if teacher_logits is None else teacher_logits.reshape(-1, logits.shape[-1])[keep]
    labels = labels[keep]
    n = int(labels.shape[0])
    if n == 0:
        zero = logits.sum() * 0.0
        return MLMOutput(loss=zero, accuracy=zero.detach(), num_predicted=0)
    loss = distilled_cross_entropy(logits, labels, teacher_logits, alpha)
    accuracy = (logits.detach().argmax(dim=-1) == labels).float().mean()
    return MLMOutput(loss=loss, accuracy=accuracy, num_predicted=n)
