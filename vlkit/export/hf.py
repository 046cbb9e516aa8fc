"""Hugging Face export: a model as a folder ``transformers`` loads, where a transformers class computes exactly
the same embeddings, checked at export.

Which vlkit families map onto a transformers class:

- ``clip`` (ViT with a class token and a causal text transformer pooled at its end token, bias-free
  projections) is ``transformers.CLIPModel``: written by :func:`vlkit.models.clip.convert.export_hf`. A LiT run
  on a CLIP is a CLIP and exports the same way.
- ``brivl``: the image tower (EfficientNet-Lite0, multi-scale patch pooling, self-attention, MLP) is no
  transformers vision model, and the text side mean-pools a self-attention head over MiniLM, where
  ``VisionTextDualEncoderModel`` projects BERT's tanh pooler output: no class reproduces it.
- ``coca``: attention-pooled image embedding and a text tower with a trailing class token; transformers has
  no CoCa.
- ``blip``, ``albef``: the ViT has a LayerNorm before its blocks and the text transformer is pre-norm, while
  transformers' BLIP is a post-norm BERT without it (and it has no ALBEF); ``blip2``, ``vlmo``: no matching
  class either.

Those are refused with one line naming what is supported; ``--format onnx`` and ``--format torchscript``
export every two-tower family.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F

from vlkit.errors import VlkitError
from vlkit.export.onnx import CHECK_BATCHES, TOKENIZER_FILE, TOLERANCE, _text_batch
from vlkit.utils.fs import atomic_directory

HF_CLASS = "CLIPModel"
REPORT_FILE = "vlkit_export.json"

#: why each family has no transformers class, for the refusal
NO_MATCH = {
    "brivl": "its EfficientNet + patch-pooling image tower is no transformers vision model and its text head "
             "(self-attention and masked mean over MiniLM) is not VisionTextDualEncoderModel's BERT pooler",
    "coca": "transformers has no CoCa (attention-pooled image embedding, text class token at the end)",
    "blip": "transformers' BLIP is a post-norm BERT and a ViT without vlkit's pre-LayerNorm",
    "albef": "transformers has no ALBEF",
    "blip2": "transformers' BLIP-2 uses another vision tower and Q-Former layout",
    "vlmo": "transformers has no VLMo",
}


def require_transformers() -> Any:
    """Import ``transformers``, or raise a one-line :class:`VlkitError` saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise VlkitError("--format hf needs the 'transformers' package: pip install transformers") from None
    return transformers


def check_exportable(model: Any) -> None:
    """Raise unless ``model`` maps exactly onto a transformers class (see the module docstring).

    Raises:
        VlkitError: one line naming the family, why it does not map, and what is supported.
    """
    from vlkit.models.clip.convert import hf_config_dict

    name = getattr(model, "architecture", type(model).__name__)
    if name != "clip":
        why = NO_MATCH.get(name, "no transformers class computes its embeddings")
        raise VlkitError(f"{name}: --format hf exports CLIP models only (as transformers {HF_CLASS}): {why}; "
                         "use --format onnx or --format torchscript")
    try:
        hf_config_dict(model)
    except VlkitError as exc:
        raise VlkitError(f"clip: cannot be written as transformers {HF_CLASS}: {exc}") from None


def _features(out: Any) -> torch.Tensor:
    return getattr(out, "pooler_output", out)  # transformers 5 may return an output object


def compare_with_transformers(folder: Path, loaded: Any, seed: int = 0) -> dict[str, float]:
    """Load ``folder`` with ``transformers.CLIPModel`` and return the largest absolute difference of its
    normalised embeddings to ``loaded``'s, per encoder, over random batches (two sizes, two text lengths)."""
    transformers = require_transformers()
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the command prints one line of its own
    try:
        hf = transformers.CLIPModel.from_pretrained(folder).eval()
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    model, tokenizer = loaded.model, loaded.tokenizer
    size, context = int(model.preprocess.image_size), int(model.preprocess.context_length)
    gen = torch.Generator().manual_seed(seed)
    diffs = {"image": 0.0, "text": 0.0}
    with torch.no_grad():
        for n in CHECK_BATCHES:
            pixels = torch.randn(n, 3, size, size, generator=gen)  # [batch, 3, S, S]
            got = F.normalize(_features(hf.get_image_features(pixel_values=pixels)), dim=-1)
            diffs["image"] = max(diffs["image"], float((got - model.encode_image(pixels)).abs().max()))
            for length in sorted({min(5, context), context}):
                feeds = _text_batch(tokenizer, n, length, gen)
                got = F.normalize(_features(hf.get_text_features(**feeds)), dim=-1)
                diffs["text"] = max(diffs["text"], float((got - model.encode_text(**feeds)).abs().max()))
    return diffs


def export_hf_folder(loaded: Any, out: str | Path, *, inputs: Iterable[str | Path] = (), what: str | None = None,
                     tolerance: float = TOLERANCE, card: bool = True) -> dict[str, float]:
    """Write ``loaded`` as a transformers ``CLIPModel`` folder with its tokenizer and model card, checked by
    loading it back with transformers.

    Args:
        loaded: a :class:`~vlkit.inference.loading.LoadedModel`.
        out: the folder: new, empty or an earlier vlkit model folder (replaced whole).
        inputs: paths the command read (never written over).
        what: how the user named ``out``, for messages.
        tolerance: the largest absolute difference of the embeddings accepted.
        card: write the model card (``README.md``).

    Returns:
        The largest absolute difference to PyTorch per encoder (``image``, ``text``).

    Raises:
        VlkitError: a family without a matching transformers class, transformers missing, or embeddings that
            differ by more than ``tolerance``; ``out`` is then left as it was.
    """
    from vlkit.export.card import CARD_FILE, model_card, read_training
    from vlkit.models.clip.convert import export_hf

    require_transformers()
    check_exportable(loaded.model)
    if loaded.tokenizer is None:
        raise VlkitError(f"clip: no tokenizer saved with the model ({loaded.source}); the text encoder "
                         "cannot be checked without one")
    record = read_training(loaded.source) if card else None  # read and checked before anything is written
    model = loaded.model.eval()
    with atomic_directory(out, "model", inputs=inputs, what=what) as tmp:
        export_hf(model, tmp / "hf")  # a folder of its own, written whole, then lifted into place
        for item in (tmp / "hf").iterdir():
            item.rename(tmp / item.name)
        (tmp / "hf").rmdir()
        if not (tmp / TOKENIZER_FILE).exists():
            loaded.tokenizer.save(tmp / TOKENIZER_FILE)
        diffs = compare_with_transformers(tmp, loaded)
        worst = max(diffs, key=diffs.get)
        if not diffs[worst] <= tolerance:
            raise VlkitError(f"clip: transformers' {HF_CLASS} {worst} embeddings differ from PyTorch by "
                             f"{diffs[worst]:.3g} (max abs, tolerance {tolerance:g}); nothing written")
        (tmp / REPORT_FILE).write_text(json.dumps({
            "format": "hf", "model": "clip", "class": HF_CLASS, "fingerprint": loaded.tag,
            "source": str(loaded.source), "max_abs_diff": diffs}, indent=2) + "\n")
        if record is not None:
            files = {"config.json": "transformers.CLIPConfig (with vlkit_version)",
                     "model.safetensors": "the weights under transformers' CLIPModel names",
                     "preprocessor_config.json": "CLIPImageProcessor settings (size, mean, std)",
                     TOKENIZER_FILE: "the tokenizer (Hugging Face tokenizers format)",
                     REPORT_FILE: "the fingerprint and the check's figures"}
            (tmp / CARD_FILE).write_text(model_card(loaded, "hf", record, files, diffs), encoding="utf-8")
    return diffs
