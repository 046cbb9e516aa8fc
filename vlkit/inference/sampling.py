"""Token choice for :func:`vlkit.inference.generate.generate` without beams: greedy and sampling (temperature,
top-k, nucleus), and the constraints every strategy shares (no end token before ``min_new_tokens``, no repeated
n-gram)."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor


class NextTokenLogits(Protocol):
    """Where the decoding strategies get next-token logits from (cached or recomputed, see ``generate``).

    ``start()`` gives the logits ``[rows, vocab]`` after the start and prompt tokens, each image's row repeated
    for its beams or samples; ``advance(tokens, index)`` keeps the rows at ``index`` (None: all, in order; else
    each kept row continues from row ``index[r]``), appends ``tokens`` ``[kept rows]`` and gives the next logits.
    """

    def start(self) -> Tensor: ...

    def advance(self, tokens: Tensor, index: Tensor | None) -> Tensor: ...


def no_repeat_ngram_bans(history: list[list[int]], n: int) -> list[list[int]]:
    """For each sequence, the tokens that would complete an ``n``-gram it already holds.

    Args:
        history: the tokens of each sequence so far (start and prompt tokens included).
        n: n-gram size (> 0).

    Returns:
        per sequence, the banned next tokens.
    """
    bans = []
    for seq in history:
        if len(seq) < n:
            bans.append([])
            continue
        prefix = seq[len(seq) - n + 1:] if n > 1 else []
        bans.append([seq[i + n - 1] for i in range(len(seq) - n + 1) if seq[i:i + n - 1] == prefix])
    return bans


def constrain(logprobs: Tensor, step: int, history: Tensor, *, eos_token_id: int, min_new_tokens: int,
              no_repeat_ngram_size: int) -> Tensor:
    """Next-token log-probabilities ``[rows, vocab]`` with forbidden tokens at ``-inf``: the end token before
    ``min_new_tokens`` new tokens, tokens that would repeat an n-gram of ``history`` ``[rows, length]``. A row
    left with no allowed token keeps its unconstrained values."""
    out = logprobs
    if step < min_new_tokens:
        out = out.clone()
        out[:, eos_token_id] = float("-inf")
    if no_repeat_ngram_size > 0:
        bans = no_repeat_ngram_bans(history.tolist(), no_repeat_ngram_size)
        rows = [r for r, banned in enumerate(bans) for _ in banned]
        if rows:
            out = out.clone() if out is logprobs else out
            cols = [t for banned in bans for t in banned]
            out[torch.tensor(rows, device=out.device), torch.tensor(cols, device=out.device)] = float("-inf")
    if out is not logprobs:
        dead = torch.isneginf(out).all(dim=-1)
        if bool(dead.any()):
            out[dead] = logprobs[dead]
    return out


def filter_top_k(logits: Tensor, k: int) -> Tensor:
    """Keep the ``k`` largest logits of each row (ties at the k-th value kept), the others ``-inf``."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[:, -1:]  # [rows, 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: Tensor, p: float) -> Tensor:
    """Nucleus filtering: keep the most likely tokens until their probability reaches ``p`` (at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each token
    drop_sorted = mass_before >= p
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def choose(logprobs: Tensor, *, do_sample: bool, temperature: float, top_k: int, top_p: float,
           generator: torch.Generator | None) -> Tensor:
    """The next token of each row ``[rows]``: the most likely one, or a sample from the tempered, top-k and
    top-p filtered distribution (drawn with ``generator``, which must live on the logits' device)."""
    if not do_sample:
        return logprobs.argmax(dim=-1)
    logits = filter_top_p(filter_top_k(logprobs / temperature, top_k), top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def greedy_or_sample(steps: NextTokenLogits, start_ids: Tensor, *, max_new_tokens: int, min_new_tokens: int,
                     eos_token_id: int, pad_token_id: int, no_repeat_ngram_size: int, do_sample: bool,
                     temperature: float, top_k: int, top_p: float, generator: torch.Generator | None
                     ) -> tuple[list[list[int]], list[float]]:
    """Decode one token at a time until every row has written the end token or ``max_new_tokens``.

    Finished rows leave the batch (their cache rows are dropped), so a batch costs what its open rows cost.

    Args:
        steps: the logits source, one row per sequence.
        start_ids: ``[rows, prompt]`` the start and prompt tokens of each row (for the n-gram constraint).

    Returns:
        per row, the new tokens (up to, not including, the end token), and the sum of the model's
        log-probabilities of the chosen tokens, the end token included when written.
    """
    rows = start_ids.shape[0]
    device = start_ids.device
    tokens = torch.full((rows, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    scores = torch.zeros(rows, dtype=torch.float64, device=device)
    alive = torch.arange(rows, device=device)  # the original row of each row still decoding
    logits = steps.start()  # [rows, vocab]
    for t in range(max_new_tokens):
        logprobs = logits.float().log_softmax(dim=-1)
        history = torch.cat([start_ids[alive], tokens[alive, :t]], dim=1) if no_repeat_ngram_size else start_ids
        allowed = constrain(logprobs, t, history, eos_token_id=eos_token_id, min_new_tokens=min_new_tokens,
                            no_repeat_ngram_size=no_repeat_ngram_size)
        chosen = choose(allowed, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                        generator=generator)  # [alive]
        tokens[alive, t] = chosen
        scores[alive] += logprobs.gather(1, chosen[:, None]).squeeze(1).double()
        if t == max_new_tokens - 1:
            break
        open_rows = chosen != eos_token_id
        if bool(open_rows.all()):
            logits = steps.advance(chosen, None)
        elif bool(open_rows.any()):
            keep = open_rows.nonzero().squeeze(1)
            alive = alive[keep]
            logits = steps.advance(chosen[keep], keep)
        else:
            break
    sequences = []
    for row in tokens.tolist():
        sequences.append(row[:row.index(eos_token_id)] if eos_token_id in row else row)
    return sequences, scores.tolist()
