"""How a trained model writes by default: the prompt it was trained with and its decoding settings, saved beside
the weights as ``generation.json`` (as a Hugging Face model carries its ``generation_config.json``), so that
``vlkit caption``, ``vlkit eval``, ``vlkit ask`` and the web page decode as the training run's validation did
unless told otherwise."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from vlkit.errors import VlkitError

GENERATION_NAME = "generation.json"


@dataclass
class GenerationDefaults:
    """Attributes:
        prompt: the caption prefix the decoder was trained with (None: none).
        vqa_prompt: the question template a generative VQA task trained with (``{question}`` inside; None: the
            built-in ``question: {question} answer:``).
        num_beams, max_new_tokens, min_new_tokens, no_repeat_ngram_size: decoding settings of captions.
    """

    prompt: str | None = None
    vqa_prompt: str | None = None
    num_beams: int = 3
    max_new_tokens: int = 30
    min_new_tokens: int = 1
    no_repeat_ngram_size: int = 0

    def settings(self, **overrides: Any) -> dict[str, Any]:
        """:func:`vlkit.inference.generate.generate` options: these defaults, then ``overrides`` that are not None."""
        base = {"num_beams": self.num_beams, "max_new_tokens": self.max_new_tokens,
                "min_new_tokens": self.min_new_tokens, "no_repeat_ngram_size": self.no_repeat_ngram_size}
        base.update({k: v for k, v in overrides.items() if v is not None})
        return base

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


def defaults_from_tasks(tasks: Sequence[Any]) -> GenerationDefaults | None:
    """The defaults a training config's tasks imply: its captioning task's prompt and decoding settings (and a
    generative VQA task's prompt); None when no task writes text."""
    caption = next((t for t in tasks if t.name == "captioning"), None)
    vqa = next((t for t in tasks if t.name == "vqa"), None)
    if caption is None and vqa is None:
        return None
    out = GenerationDefaults(vqa_prompt=vqa.prompt if vqa is not None else None)
    if caption is not None:
        out.prompt = caption.prompt
        out.num_beams, out.max_new_tokens = caption.num_beams, caption.max_new_tokens
        out.min_new_tokens, out.no_repeat_ngram_size = caption.min_new_tokens, caption.no_repeat_ngram_size
    return out


def load_defaults(directory: str | Path) -> GenerationDefaults:
    """The defaults saved in a model directory (the built-in ones when it has no ``generation.json``).

    Raises:
        VlkitError: the file is not valid JSON or holds unknown keys.
    """
    path = Path(directory) / GENERATION_NAME
    if not path.is_file():
        return GenerationDefaults()
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VlkitError(f"{path}: not valid JSON ({exc})") from None
    known = {f.name for f in dataclasses.fields(GenerationDefaults)}
    if not isinstance(data, dict) or set(data) - known:
        raise VlkitError(f"{path}: expected an object with keys {sorted(known)}")
    return GenerationDefaults(**data)
