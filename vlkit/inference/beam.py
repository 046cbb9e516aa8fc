"""Beam search for :func:`vlkit.inference.generate.generate`.

Each image keeps ``num_beams`` open sequences, ranked by the sum of their log-probabilities. At every step the
``2 * num_beams`` best continuations over all beams are considered in order: one that writes the end token
(among the best ``num_beams``) becomes a finished hypothesis scored ``sum_logprobs / length ** length_penalty``
(``length``: the new tokens, the end token included); the others, best first, become the next beams. An image
keeps its ``num_beams`` best hypotheses; at ``max_new_tokens`` its open beams are finished as they stand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .sampling import NextTokenLogits, constrain


@dataclass
class _Hypotheses:
    """The best finished sequences of one image, at most ``keep`` of them, as ``(score, tokens)``."""

    keep: int
    items: list[tuple[float, list[int]]] = field(default_factory=list)

    def add(self, score: float, tokens: list[int]) -> None:
        self.items.append((score, tokens))
        if len(self.items) > self.keep:
            self.items.sort(key=lambda item: -item[0])
            self.items.pop()

    @property
    def worst(self) -> float:
        return min(score for score, _ in self.items)

    def best(self, n: int) -> list[tuple[float, list[int]]]:
        return sorted(self.items, key=lambda item: -item[0])[:n]


def _attainable(open_sum: float, step: int, max_new_tokens: int, length_penalty: float) -> float:
    """The best score an open beam (``open_sum`` over ``step + 1`` tokens) can still reach: its sum can only
    fall, its length lies in ``[step + 2, max_new_tokens]``."""
    length = max_new_tokens if length_penalty > 0 else step + 2
    return open_sum / length ** length_penalty


def beam_search(steps: NextTokenLogits, start_ids: Tensor, *, num_beams: int, max_new_tokens: int,
                min_new_tokens: int, eos_token_id: int, pad_token_id: int, length_penalty: float,
                early_stopping: bool, no_repeat_ngram_size: int, num_return_sequences: int
                ) -> list[list[tuple[list[int], float]]]:
    """Beam search over a batch of images.

    Args:
        steps: the logits source, ``num_beams`` rows per image (``[i0b0, i0b1, ..., i1b0, ...]``).
        start_ids: ``[images, prompt]`` the start and prompt tokens of each image.
        early_stopping: stop an image once it holds ``num_beams`` hypotheses and no open beam can beat the
            worst of them (its sum of log-probabilities can only fall); False: go on to ``max_new_tokens``.
            Both give the same result; stopping saves the steps that cannot change it.

    Returns:
        per image, the ``num_return_sequences`` best ``(new tokens without the end token, score)``, best first.
    """
    k = num_beams
    images, device = start_ids.shape[0], start_ids.device
    hyps = [_Hypotheses(k) for _ in range(images)]
    active = list(range(images))  # the images still searched, in row order
    beam_scores = torch.zeros(images, k, dtype=torch.float64, device=device)
    beam_scores[:, 1:] = float("-inf")  # the beams of an image start equal: only the first one is open
    generated = torch.empty(images * k, 0, dtype=torch.long, device=device)
    logits = steps.start()  # [images * beams, vocab]
    for t in range(max_new_tokens):
        logprobs = logits.float().log_softmax(dim=-1)
        vocab = logprobs.shape[-1]
        history = start_ids if not no_repeat_ngram_size else \
            torch.cat([start_ids[active].repeat_interleave(k, dim=0), generated], dim=1)
        logprobs = constrain(logprobs, t, history, eos_token_id=eos_token_id, min_new_tokens=min_new_tokens,
                             no_repeat_ngram_size=no_repeat_ngram_size)
        totals = (beam_scores.reshape(-1, 1) + logprobs.double()).reshape(len(active), k * vocab)
        top_scores, top_index = totals.topk(min(2 * k, k * vocab), dim=-1)  # [images, 2 * beams]
        next_scores = torch.full((len(active), k), float("-inf"), dtype=torch.float64)
        next_tokens = torch.full((len(active), k), pad_token_id, dtype=torch.long)
        next_parents = torch.zeros(len(active), k, dtype=torch.long)
        rows_generated = generated.tolist()
        for a, (scores_a, index_a) in enumerate(zip(top_scores.tolist(), top_index.tolist())):
            slot = 0
            for rank, (score, index) in enumerate(zip(scores_a, index_a)):
                if score == float("-inf") or slot == k:
                    break
                beam, token = divmod(index, vocab)
                if token == eos_token_id:
                    if rank < k:
                        hyps[active[a]].add(score / (t + 1) ** length_penalty, rows_generated[a * k + beam])
                    continue
                next_scores[a, slot], next_tokens[a, slot], next_parents[a, slot] = score, token, beam
                slot += 1
        parents = (torch.arange(len(active))[:, None] * k + next_parents).reshape(-1).to(device)  # [rows]
        generated = torch.cat([generated[parents], next_tokens.reshape(-1, 1).to(device)], dim=1)
        beam_scores = next_scores.to(device)
        if t == max_new_tokens - 1:
            break
        still = [a for a, image in enumerate(active) if not _image_done(
            hyps[image], next_scores[a], t, k, max_new_tokens, length_penalty, early_stopping)]
        if not still:
            active = []
            break
        if len(still) < len(active):
            rows = torch.tensor([a * k + j for a in still for j in range(k)], device=device)
            active = [active[a] for a in still]
            beam_scores, generated = beam_scores[still], generated[rows]
            logits = steps.advance(next_tokens.reshape(-1).to(device)[rows], parents[rows])
        else:
            logits = steps.advance(next_tokens.reshape(-1).to(device), parents)
    rows_generated = generated.tolist()
    for a, image in enumerate(active):  # open beams at max_new_tokens finish as they stand
        for j, score in enumerate(beam_scores[a].tolist()):
            if score != float("-inf"):
                hyps[image].add(score / len(rows_generated[a * k + j]) ** length_penalty,
                                rows_generated[a * k + j])
    return [[(tokens, score) for score, tokens in h.best(num_return_sequences)] for h in hyps]


def _image_done(hyps: _Hypotheses, open_scores: Tensor, step: int, num_beams: int, max_new_tokens: int,
                length_penalty: float, early_stopping: bool) -> bool:
    """Whether an image's search is over after ``step``: no open beam is left, or (``early_stopping``) it holds
    ``num_beams`` hypotheses and none of its open beams can beat the worst of them."""
    best_open = float(open_scores.max())
    if best_open == float("-inf") or math.isnan(best_open):
        return True
    if not early_stopping or len(hyps.items) < num_beams:
        return False
    return _attainable(best_open, step, max_new_tokens, length_penalty) <= hyps.worst
