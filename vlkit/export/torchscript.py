"""TorchScript export of a model's image and text encoders, checked against PyTorch.

``export_torchscript`` traces ``encode_image`` and ``encode_text``, freezes the traces (weights inlined, unused
parts such as momentum copies dropped) and writes ``image_encoder.pt`` (``pixels`` float32 ``[batch, 3, S, S]``
-> ``[batch, dim]``) and ``text_encoder.pt`` (``input_ids``, ``attention_mask`` int64 ``[batch, length]`` ->
``[batch, dim]``), the tokenizer, ``export.json`` and the model card. ``torch.jit.load`` reads the files without
vlkit. The files written are loaded back and run on batches of other sizes and text lengths than the traced
ones; an output more than the tolerance away from PyTorch's leaves nothing behind.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from vlkit.errors import VlkitError
from vlkit.export.onnx import (CHECK_BATCHES, EXPORT_KIND, REPORT_FILE, TOKENIZER_FILE, TOLERANCE, ImageEncoder,
                               TextEncoder, _text_batch)
from vlkit.utils.fs import atomic_directory

IMAGE_FILE = "image_encoder.pt"
TEXT_FILE = "text_encoder.pt"


@dataclass
class TorchScriptReport:
    """What ``export.json`` holds for a TorchScript export.

    Attributes:
        format: always ``"torchscript"``.
        model: the architecture name (``clip``, ``brivl``, ...).
        fingerprint: the model's fingerprint (as ``vlkit embed`` tags embeddings with it).
        source: the run, model folder or checkpoint exported.
        torch_version: the PyTorch that wrote the files.
        embed_dim: width of the embeddings.
        image: the image encoder's file, input and output names and shapes.
        text: the text encoder's file, input and output names and shapes.
        preprocess: image size, mean and std (on the [0, 1] scale), context length and tokenizer file.
        max_abs_diff: largest absolute difference to PyTorch per encoder, over the checked batches.
        checked: the batch sizes and text lengths checked (the trace used batch 2, text length 8 or less).
    """

    format: str
    model: str
    fingerprint: str
    source: str
    torch_version: str
    embed_dim: int
    image: dict[str, Any]
    text: dict[str, Any]
    preprocess: dict[str, Any]
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    checked: dict[str, list[int]] = field(default_factory=dict)


def _trace(module: nn.Module, args: tuple[Tensor, ...], what: str, name: str) -> torch.jit.ScriptModule:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings: the check below runs other shapes instead
            traced = torch.jit.trace(module, args, check_trace=False)
            return torch.jit.freeze(traced.eval())
    except Exception as exc:  # the tracer raises many kinds; the first line says what failed
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise VlkitError(f"{name}: the {what} does not trace to TorchScript ({type(exc).__name__}: "
                         f"{first[:300]})") from None


def _compare(module: torch.jit.ScriptModule, args: tuple[Tensor, ...], expected: Tensor, what: str,
             name: str) -> float:
    try:
        out = module(*args)
    except Exception as exc:  # a trace that fixed a shape fails here with a TorchScript error
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        shape = "x".join(str(d) for d in args[0].shape)
        raise VlkitError(f"{name}: the TorchScript {what} does not run on a {shape} batch (the trace fixed a "
                         f"shape: {first[:200]})") from None
    if not isinstance(out, Tensor) or out.shape != expected.shape:
        return float("inf")
    return float((out - expected).abs().max())


def export_torchscript(loaded: Any, out: str | Path, *, inputs: Iterable[str | Path] = (), what: str | None = None,
                       tolerance: float = TOLERANCE, seed: int = 0, card: bool = True) -> TorchScriptReport:
    """Export ``loaded``'s image and text encoders as TorchScript files in ``out``, checked against PyTorch.

    Args:
        loaded: a :class:`~vlkit.inference.loading.LoadedModel` whose model has ``encode_image``/``encode_text``.
        out: the folder to write: new, empty or an earlier vlkit export (replaced whole).
        inputs: paths the command read (never written over).
        what: how the user named ``out``, for messages.
        tolerance: the largest absolute difference to PyTorch accepted.
        seed: seed of the random trace and check batches.
        card: write the model card (``README.md``; :mod:`vlkit.export.card`).

    Returns:
        The report written to ``export.json``.

    Raises:
        VlkitError: a model without the encoders or a tokenizer, an encoder that does not trace, runs only at
            the traced shapes, or differs from PyTorch by more than ``tolerance``; ``out`` is then left as it was.
    """
    from vlkit.export.card import CARD_FILE, model_card, read_training

    model, name = loaded.model.eval(), getattr(loaded.model, "architecture", type(loaded.model).__name__)
    for method in ("encode_image", "encode_text"):
        if not callable(getattr(model, method, None)):
            raise VlkitError(f"{name}: the model has no {method}; only models with image and text encoders export")
    if loaded.tokenizer is None:
        raise VlkitError(f"{name}: no tokenizer saved with the model ({loaded.source}); the text encoder "
                         "cannot be checked without one")
    record = read_training(loaded.source) if card else None  # read and checked before anything is written
    pre = model.preprocess
    size, context = int(pre.image_size), int(pre.context_length)
    gen = torch.Generator().manual_seed(seed)
    check_lens = sorted({min(5, context), context})
    with atomic_directory(out, EXPORT_KIND, inputs=inputs, what=what) as tmp, torch.no_grad(), \
            warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated", category=DeprecationWarning)
        pixels = torch.randn(2, 3, size, size, generator=gen)  # [batch, 3, S, S]
        torch.jit.save(_trace(ImageEncoder(model), (pixels,), "image encoder", name), str(tmp / IMAGE_FILE))
        text = _text_batch(loaded.tokenizer, 2, min(8, context), gen)
        torch.jit.save(_trace(TextEncoder(model), (text["input_ids"], text["attention_mask"]), "text encoder", name),
                       str(tmp / TEXT_FILE))
        image_module = torch.jit.load(str(tmp / IMAGE_FILE), map_location="cpu")  # what a user will load
        text_module = torch.jit.load(str(tmp / TEXT_FILE), map_location="cpu")
        diffs = {"image": 0.0, "text": 0.0}
        for n in CHECK_BATCHES:
            pixels = torch.randn(n, 3, size, size, generator=gen)
            diffs["image"] = max(diffs["image"], _compare(image_module, (pixels,), model.encode_image(pixels),
                                                          "image encoder", name))
            for text_len in check_lens:
                feeds = _text_batch(loaded.tokenizer, n, text_len, gen)
                diffs["text"] = max(diffs["text"], _compare(text_module, (feeds["input_ids"], feeds["attention_mask"]),
                                                            model.encode_text(**feeds), "text encoder", name))
        worst = max(diffs, key=diffs.get)
        if not diffs[worst] <= tolerance:
            raise VlkitError(f"{name}: the TorchScript {worst} encoder differs from PyTorch by {diffs[worst]:.3g} "
                             f"(max abs, tolerance {tolerance:g}); nothing written")
        dim = int(model.encode_image(pixels[:1]).shape[-1])
        loaded.tokenizer.save(tmp / TOKENIZER_FILE)
        report = TorchScriptReport(
            format="torchscript", model=name, fingerprint=loaded.tag, source=str(loaded.source),
            torch_version=torch.__version__.split("+")[0], embed_dim=dim,
            image={"file": IMAGE_FILE, "inputs": {"pixels": ["batch", 3, size, size]},
                   "outputs": {"image_embeds": ["batch", dim]}, "dtype": "float32"},
            text={"file": TEXT_FILE, "inputs": {"input_ids": ["batch", "length"],
                                               "attention_mask": ["batch", "length"]},
                  "outputs": {"text_embeds": ["batch", dim]}, "dtype": "int64", "max_length": context},
            preprocess={"image_size": size, "mean": list(pre.mean), "std": list(pre.std),
                        "context_length": context, "tokenizer": TOKENIZER_FILE, "pad_id": loaded.tokenizer.pad_id,
                        "normalized": True},
            max_abs_diff=diffs, checked={"batch": list(CHECK_BATCHES), "length": check_lens})
        (tmp / REPORT_FILE).write_text(json.dumps(asdict(report), indent=2) + "\n")
        if record is not None:
            files = {IMAGE_FILE: f"pixels [batch, 3, {size}, {size}] float32 -> image_embeds [batch, {dim}]",
                     TEXT_FILE: "input_ids, attention_mask [batch, length] int64 -> text_embeds "
                                f"[batch, {dim}] (length up to {context})",
                     TOKENIZER_FILE: "the tokenizer (Hugging Face tokenizers format)",
                     REPORT_FILE: "shapes, preprocessing and the check's figures"}
            (tmp / CARD_FILE).write_text(model_card(loaded, "torchscript", record, files, diffs), encoding="utf-8")
    return report
