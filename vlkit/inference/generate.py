"""One ``generate`` for every vlkit model with a text decoder: greedy, beam search and sampling over the
decoding interface of :mod:`vlkit.inference.interface`.

The image is encoded once per batch (``model.start_decoding``); beams and samples share it through
``DecoderCache.repeat_interleave``, beam search reorders the cache after each step, and every step runs only
the new token (``model.decode_step``). ``use_cache=False`` is the reference: each step runs the whole prefix
again through ``model.caption_logits``.

Example:
    >>> out = generate(model, images, num_beams=3, max_new_tokens=20)
    >>> out.texts(tokenizer)[0][0]          # the best caption of the first image
"""

from __future__ import annotations

from collections import defaultdict
from numbers import Integral
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from vlkit.errors import VlkitError

from .beam import beam_search
from .interface import GenerationSpec, require_generative
from .sampling import greedy_or_sample


@dataclass
class GenerationOutput:
    """What :func:`generate` wrote.

    Attributes:
        sequences: per image, per returned sequence, the new token ids (without the start and prompt tokens,
            without the end token and the padding after it).
        scores: per image, per returned sequence: beam search, the length-penalised score
            ``sum_logprobs / length ** length_penalty``; greedy and sampling, the sum of the model's
            log-probabilities of the chosen tokens (temperature 1, before any filtering). The end token counts
            (in the sum and in the length) when the sequence wrote it.
        prompt_lengths: per image, the prompt tokens given after the start token.
    """

    sequences: list[list[list[int]]]
    scores: list[list[float]]
    prompt_lengths: list[int]

    def texts(self, tokenizer) -> list[list[str]]:
        """The sequences as text, per image and returned sequence, through ``tokenizer.decode(ids)``."""
        return [[tokenizer.decode(seq) for seq in image] for image in self.sequences]


class _CachedSteps:
    """Incremental decoding: the images encoded once, the prompt run once per image, each step one token."""

    def __init__(self, model: nn.Module, images: Tensor, start_ids: Tensor, copies: int, max_length: int):
        self.model, self.images, self.start_ids, self.copies = model, images, start_ids, copies
        self.max_length = max_length
        self.cache = None

    def start(self) -> Tensor:
        cache = self.model.start_decoding(self.images, self.max_length)
        logits = self.model.decode_step(self.start_ids, cache)[:, -1]  # [images, vocab]
        self.cache = cache.repeat_interleave(self.copies)
        return logits.repeat_interleave(self.copies, dim=0)  # [images * copies, vocab]

    def advance(self, tokens: Tensor, index: Tensor | None) -> Tensor:
        if index is not None:
            if index.numel() == self.cache.batch_size:
                self.cache.reorder(index)  # beams of the same image: the context stays
            else:
                self.cache = self.cache.select(index)  # finished rows leave
        return self.model.decode_step(tokens[:, None], self.cache)[:, -1]


class _RecomputedSteps:
    """The reference: each step runs the whole prefix again through ``caption_logits``."""

    def __init__(self, model: nn.Module, images: Tensor, start_ids: Tensor, copies: int):
        self.model = model
        self.images = images.repeat_interleave(copies, dim=0)  # [rows, ...]
        self.prefix = start_ids.repeat_interleave(copies, dim=0)  # [rows, length]

    def _logits(self) -> Tensor:
        mask = torch.ones_like(self.prefix)
        return self.model.caption_logits(self.images, self.prefix, mask)[:, -1]

    def start(self) -> Tensor:
        return self._logits()

    def advance(self, tokens: Tensor, index: Tensor | None) -> Tensor:
        if index is not None:
            self.images, self.prefix = self.images[index], self.prefix[index]
        self.prefix = torch.cat([self.prefix, tokens[:, None]], dim=1)
        return self._logits()


def generate(
    model: nn.Module,
    images: Tensor,
    *,
    max_new_tokens: int = 30,
    min_new_tokens: int = 0,
    num_beams: int = 1,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    length_penalty: float = 1.0,
    early_stopping: bool = True,
    no_repeat_ngram_size: int = 0,
    num_return_sequences: int = 1,
    prompt_ids: Sequence[int] | Sequence[Sequence[int]] | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
) -> GenerationOutput:
    """Write text about each image with a model that has a text decoder (see :mod:`vlkit.inference.interface`).

    Args:
        model: a generative model (DDP / compile wrappers are looked through); its train/eval state is restored.
        images: ``[batch, 3, height, width]``, moved to the model's device.
        max_new_tokens: most tokens written after the prompt (capped by the decoder's ``max_length``).
        min_new_tokens: the end token is forbidden before this many new tokens.
        num_beams: beams per image (1: greedy or sampling).
        do_sample: sample instead of taking the most likely token (``num_beams`` must be 1).
        temperature: sampling temperature (> 0).
        top_k: sample among the ``top_k`` most likely tokens (0: all).
        top_p: sample among the most likely tokens whose probability reaches ``top_p`` (1: all).
        length_penalty: beam scores are ``sum_logprobs / length ** length_penalty`` (0: plain sums; > 0
            favours longer sequences).
        early_stopping: beam search stops an image once it holds ``num_beams`` finished hypotheses that no open
            beam can beat (the result is the same as without; it only saves steps).
        no_repeat_ngram_size: forbid tokens that would repeat an n-gram of this size already in the sequence
            (start and prompt tokens included); 0: off.
        num_return_sequences: sequences per image: the best hypotheses of beam search (at most ``num_beams``),
            or independent samples.
        prompt_ids: tokens that follow the start token: None, one list for every image, or one list per image
            (images with equal prompt lengths are decoded together; the output keeps the input order).
        use_cache: decode incrementally (False: recompute the whole prefix at each step, the slow reference).
        generator: random source of sampling (on the model's device), so that a seed reproduces.
        batch_size: most images decoded together (None: all with the same prompt length).

    Returns:
        a :class:`GenerationOutput`, one entry per image in input order.

    Raises:
        VlkitError: a model without a text decoder, a setting out of range, an impossible combination, a prompt
            that leaves no room in the decoder.
    """
    inner = require_generative(model)
    spec: GenerationSpec = inner.generation
    _check_settings(max_new_tokens, min_new_tokens, num_beams, do_sample, temperature, top_k, top_p,
                    no_repeat_ngram_size, num_return_sequences, batch_size)
    if not isinstance(images, Tensor) or images.dim() < 1:
        raise VlkitError("generate needs images as a tensor [batch, 3, height, width]")
    prompts = _prompts(prompt_ids, images.shape[0], spec)
    device = _device(inner, images)
    images = images.to(device)
    sequences: list = [None] * len(prompts)
    scores: list = [None] * len(prompts)
    groups: dict[int, list[int]] = defaultdict(list)
    for i, prompt in enumerate(prompts):
        groups[len(prompt)].append(i)
    step = batch_size or len(prompts) or 1
    states = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.inference_mode():
            for prompt_length, members in groups.items():
                new = min(max_new_tokens, spec.max_length - prompt_length - 1)
                for at in range(0, len(members), step):
                    chunk = members[at:at + step]
                    start_ids = torch.tensor([[spec.bos_token_id, *prompts[i]] for i in chunk], dtype=torch.long,
                                             device=device)  # [chunk, 1 + prompt]
                    results = _decode(inner, spec, images[chunk], start_ids, new, min_new_tokens, num_beams,
                                      do_sample, temperature, top_k, top_p, length_penalty, early_stopping,
                                      no_repeat_ngram_size, num_return_sequences, use_cache, generator)
                    for i, per_image in zip(chunk, results):
                        sequences[i] = [tokens for tokens, _ in per_image]
                        scores[i] = [float(score) for _, score in per_image]
    finally:
        for module, training in states:
            module.training = training
    return GenerationOutput(sequences, scores, [len(p) for p in prompts])


def _decode(model: nn.Module, spec: GenerationSpec, images: Tensor, start_ids: Tensor, new: int, min_new: int,
            num_beams: int, do_sample: bool, temperature: float, top_k: int, top_p: float, length_penalty: float,
            early_stopping: bool, no_repeat: int, num_return: int, use_cache: bool,
            generator: torch.Generator | None) -> list[list[tuple[list[int], float]]]:
    """One batch of images sharing a prompt length: per image, ``(tokens, score)`` per returned sequence."""
    copies = num_beams if num_beams > 1 else num_return
    if use_cache:
        steps = _CachedSteps(model, images, start_ids, copies, start_ids.shape[1] + new)
    else:
        steps = _RecomputedSteps(model, images, start_ids, copies)
    if num_beams > 1:
        return beam_search(steps, start_ids, num_beams=num_beams, max_new_tokens=new, min_new_tokens=min_new,
                           eos_token_id=spec.eos_token_id, pad_token_id=spec.pad_token_id,
                           length_penalty=length_penalty, early_stopping=early_stopping,
                           no_repeat_ngram_size=no_repeat, num_return_sequences=num_return)
    rows, row_scores = greedy_or_sample(
        steps, start_ids.repeat_interleave(copies, dim=0), max_new_tokens=new, min_new_tokens=min_new,
        eos_token_id=spec.eos_token_id, pad_token_id=spec.pad_token_id, no_repeat_ngram_size=no_repeat,
        do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    pairs = list(zip(rows, row_scores))
    return [pairs[i * copies:(i + 1) * copies] for i in range(start_ids.shape[0])]


def _check_settings(max_new_tokens: int, min_new_tokens: int, num_beams: int, do_sample: bool, temperature: float,
                    top_k: int, top_p: float, no_repeat_ngram_size: int, num_return_sequences: int,
                    batch_size: int | None) -> None:
    problems = []
    if max_new_tokens < 1:
        problems.append(f"max_new_tokens must be at least 1 (got {max_new_tokens})")
    if min_new_tokens < 0:
        problems.append(f"min_new_tokens must be 0 or more (got {min_new_tokens})")
    if num_beams < 1:
        problems.append(f"num_beams must be at least 1 (got {num_beams})")
    if num_return_sequences < 1:
        problems.append(f"num_return_sequences must be at least 1 (got {num_return_sequences})")
    if do_sample and temperature <= 0:
        problems.append(f"temperature must be > 0 when sampling (got {temperature}); use do_sample=False for "
                        "the most likely tokens")
    if top_k < 0:
        problems.append(f"top_k must be 0 (off) or more (got {top_k})")
    if not 0 < top_p <= 1:
        problems.append(f"top_p must lie in (0, 1] (got {top_p})")
    if no_repeat_ngram_size < 0:
        problems.append(f"no_repeat_ngram_size must be 0 (off) or more (got {no_repeat_ngram_size})")
    if batch_size is not None and batch_size < 1:
        problems.append(f"batch_size must be at least 1 (got {batch_size})")
    if do_sample and num_beams > 1:
        problems.append("sampling with beams is not supported: use do_sample=True with num_beams=1, or beam search "
                        "without sampling")
    if not do_sample and num_return_sequences > num_beams:
        what = "greedy decoding writes one sequence per image" if num_beams == 1 else \
            f"beam search keeps {num_beams} hypotheses per image"
        problems.append(f"num_return_sequences={num_return_sequences} > num_beams={num_beams}: {what}; raise "
                        "num_beams or sample (do_sample=True)")
    if problems:
        raise VlkitError("generate: " + "; ".join(problems))


def _prompts(prompt_ids, batch: int, spec: GenerationSpec) -> list[list[int]]:
    """One prompt (token ids after the start token) per image, checked against the vocabulary and positions."""
    if isinstance(prompt_ids, Tensor):
        prompt_ids = prompt_ids.tolist()
    if prompt_ids is None:
        prompts = [[] for _ in range(batch)]
    elif all(isinstance(t, Integral) for t in prompt_ids):
        prompts = [[int(t) for t in prompt_ids] for _ in range(batch)]
    else:
        prompts = [[int(t) for t in p] for p in prompt_ids]
        if len(prompts) != batch:
            raise VlkitError(f"generate: {len(prompts)} prompts for {batch} images; give one prompt for all "
                             "images or one per image")
    for i, prompt in enumerate(prompts):
        bad = [t for t in prompt if not 0 <= t < spec.vocab_size]
        if bad:
            raise VlkitError(f"generate: prompt {i} holds token ids {bad[:5]} outside the vocabulary "
                             f"(0..{spec.vocab_size - 1})")
        if 1 + len(prompt) + 1 > spec.max_length:
            raise VlkitError(f"generate: prompt {i} has {len(prompt)} tokens; with the start token it leaves no "
                             f"room for a new token in the decoder's max_length of {spec.max_length}")
    return prompts


def _device(model: nn.Module, images: Tensor) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return images.device
