"""Captions as token sequences: teacher-forcing inputs with an optional prompt prefix, and captions written by
:func:`vlkit.inference.generate.generate` turned back into text.

A caption is fed to a decoder as ``[bos] prompt caption [eos]``: the start and end tokens come from the model's
:class:`~vlkit.inference.interface.GenerationSpec` (not from the tokenizer's template, so a CLIP BPE, a BERT
WordPiece and a word-level vocabulary all work), the prompt (e.g. ``"a picture of"``, as BLIP prompts) is given,
not predicted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from vlkit.errors import VlkitError
from vlkit.inference.interface import GenerationSpec, require_generative

#: the prompt after which a generative model answers a question (``{question}`` is replaced)
VQA_PROMPT = "question: {question} answer:"


@dataclass
class CaptionInputs:
    """A tokenised batch for teacher forcing.

    Attributes:
        input_ids: ``[batch, length]`` ``[bos] prompt caption [eos]`` then padding.
        attention_mask: ``[batch, length]`` 1 on tokens.
        prompt_length: prompt tokens after ``bos`` (not scored).
    """

    input_ids: Tensor
    attention_mask: Tensor
    prompt_length: int

    def to(self, device: torch.device) -> "CaptionInputs":
        return CaptionInputs(self.input_ids.to(device, non_blocking=True),
                             self.attention_mask.to(device, non_blocking=True), self.prompt_length)


def prompt_ids(tokenizer, prompt: str | None) -> list[int]:
    """The ids of a prompt prefix (no special tokens); ``[]`` for none."""
    prompt = (prompt or "").strip()
    return tokenizer.encode_plain(prompt) if prompt else []


def caption_inputs(tokenizer, spec: GenerationSpec, texts: Sequence[str], prompt: str | None = None) -> CaptionInputs:
    """``[bos] prompt text [eos]`` per text, cut to ``spec.max_length`` (the end token always kept), padded.

    Raises:
        VlkitError: the prompt leaves no room for a caption.
    """
    head = [spec.bos_token_id, *prompt_ids(tokenizer, prompt)]
    room = spec.max_length - len(head) - 1
    if room < 1:
        raise VlkitError(f"the prompt {prompt!r} takes {len(head) - 1} tokens; the decoder holds {spec.max_length}")
    rows = [head + tokenizer.encode_plain(text)[:room] + [spec.eos_token_id] for text in texts]
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), spec.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
    return CaptionInputs(input_ids, attention_mask, len(head) - 1)


def clean_caption(text: str) -> str:
    """A decoded caption tidied for reading and scoring: whitespace collapsed, no space before punctuation."""
    text = " ".join(text.split())
    for mark in (" .", " ,", " ?", " !", " '", " ;", " :"):
        text = text.replace(mark, mark.strip())
    return text.strip()


def write_captions(model: nn.Module, tokenizer, images: Tensor, prompt: str | Sequence[str] | None = None,
                   **settings: Any) -> list[list[tuple[str, float]]]:
    """Captions (or answers) for ``images`` ``[batch, 3, H, W]``: per image, ``num_return_sequences``
    ``(text, score)`` pairs, best first.

    Args:
        model: a generative model (see :mod:`vlkit.inference.interface`).
        tokenizer: the model's tokenizer.
        images: normalised images.
        prompt: a prefix for every image, or one per image (e.g. ``"question: ... answer:"``); it is not part
            of the returned text.
        settings: :func:`vlkit.inference.generate.generate` options (``num_beams``, ``do_sample``,
            ``max_new_tokens`` ...).
    """
    from vlkit.inference.generate import generate

    require_generative(model)
    if prompt is None or isinstance(prompt, str):
        ids: Any = prompt_ids(tokenizer, prompt) or None
    else:
        if len(prompt) != images.shape[0]:
            raise VlkitError(f"{len(prompt)} prompts for {images.shape[0]} images")
        ids = [prompt_ids(tokenizer, p) for p in prompt]
    out = generate(model, images, prompt_ids=ids, **settings)
    return [[(clean_caption(tokenizer.decode(seq)), float(score)) for seq, score in zip(seqs, scores)]
            for seqs, scores in zip(out.sequences, out.scores)]
