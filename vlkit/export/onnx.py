"""ONNX export of a model's image and text encoders, checked against PyTorch with onnxruntime.

``export_onnx`` writes ``image_encoder.onnx`` (``pixels`` float32 ``[batch, 3, S, S]`` -> ``image_embeds``
``[batch, dim]``), ``text_encoder.onnx`` (``input_ids``, ``attention_mask`` int64 ``[batch, length]`` ->
``text_embeds`` ``[batch, dim]``), the tokenizer as ``tokenizer.json``, ``export.json`` (fingerprint, opset,
shapes, preprocessing and the largest difference to PyTorch measured at export) and the model card
``README.md`` (:mod:`vlkit.export.card`). The embeddings are
L2-normalised, as ``encode_image``/``encode_text`` return them. The folder appears whole or not at all: a
model whose ONNX outputs differ from PyTorch's by more than the tolerance leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from vlkit.errors import VlkitError
from vlkit.utils.fs import atomic_directory

EXPORT_KIND = "export"
IMAGE_FILE = "image_encoder.onnx"
TEXT_FILE = "text_encoder.onnx"
TOKENIZER_FILE = "tokenizer.json"
REPORT_FILE = "export.json"
#: the lowest opset torch's exporter writes natively (``torch.onnx.export(..., dynamo=True)``)
MIN_OPSET = 18
DEFAULT_OPSET = 18
#: largest absolute difference to PyTorch an export may show
TOLERANCE = 1e-4
#: batch sizes and text lengths the check runs (two of each, so the dynamic axes are exercised)
CHECK_BATCHES = (2, 3)


def require_onnx() -> tuple[Any, Any]:
    """Import ``onnx`` and ``onnxruntime`` (and check ``onnxscript``, which torch's exporter needs).

    Returns:
        The ``onnx`` and ``onnxruntime`` modules.

    Raises:
        VlkitError: one of them is not installed (one line naming the extra to install).
    """
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401  (torch.onnx.export with dynamo=True imports it)
    except ImportError as exc:
        raise VlkitError(f"ONNX export needs onnx, onnxscript and onnxruntime ({exc.name} is missing): "
                         "pip install 'vlkit[onnx]'") from None
    return onnx, onnxruntime


class ImageEncoder(nn.Module):
    """``model.encode_image`` as a module: ``pixels [batch, 3, S, S]`` -> ``[batch, dim]`` (L2-normalised)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: Tensor) -> Tensor:
        return self.model.encode_image(pixels)


class TextEncoder(nn.Module):
    """``model.encode_text`` as a module: ``input_ids``, ``attention_mask`` ``[batch, length]`` -> ``[batch, dim]``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model.encode_text(input_ids, attention_mask)


@dataclass
class ExportReport:
    """What ``export.json`` holds.

    Attributes:
        format: always ``"onnx"``.
        model: the architecture name (``clip``, ``brivl``, ...).
        fingerprint: the model's fingerprint (as ``vlkit embed`` tags embeddings with it).
        source: the run, model folder or checkpoint exported.
        opset: the ONNX opset of both files.
        embed_dim: width of the embeddings.
        image: the image encoder's file, input and output names and shapes.
        text: the text encoder's file, input and output names and shapes.
        preprocess: image size, mean and std (on the [0, 1] scale), context length and tokenizer file.
        max_abs_diff: largest absolute difference to PyTorch per encoder, over the checked batches.
        checked: the batch sizes and text lengths checked with onnxruntime.
    """

    format: str
    model: str
    fingerprint: str
    source: str
    opset: int
    embed_dim: int
    image: dict[str, Any]
    text: dict[str, Any]
    preprocess: dict[str, Any]
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    checked: dict[str, list[int]] = field(default_factory=dict)


def _text_batch(tokenizer: Any, batch: int, length: int, generator: torch.Generator) -> dict[str, Tensor]:
    """Random ids framed by the tokenizer's own special tokens; the first row is two tokens shorter (padded)."""
    frame = tokenizer([""])["input_ids"][0].tolist()  # e.g. [CLS] [SEP]
    head, tail = frame[:1], frame[1:]
    ids = torch.full((batch, length), tokenizer.pad_id, dtype=torch.int64)  # [batch, length]
    mask = torch.zeros((batch, length), dtype=torch.int64)  # [batch, length]
    for row in range(batch):
        n = max(length - (2 if row == 0 else 0), len(frame))
        middle = torch.randint(0, tokenizer.vocab_size, (n - len(frame),), generator=generator).tolist()
        ids[row, :n] = torch.tensor(head + middle + tail, dtype=torch.int64)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _export(module: nn.Module, args: tuple[Tensor, ...], path: Path, inputs: list[str], output: str,
            dynamic: dict[str, dict[int, Any]], opset: int, what: str, name: str) -> None:
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)  # torchvision absent
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, str(path), input_names=inputs, output_names=[output],
                              dynamic_shapes=dynamic, opset_version=opset, dynamo=True, external_data=False,
                              verbose=False)
    except Exception as exc:  # the exporter raises many kinds; the first line says what failed
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise VlkitError(f"{name}: the {what} does not export to ONNX ({type(exc).__name__}: {first[:300]})") from None


def _check_axes(graph: Any, axes: dict[str, dict[int, str]], what: str, name: str) -> None:
    """Raise unless every axis meant to be dynamic is symbolic in the ONNX graph's inputs (the exporter fixes
    an axis the model's code makes constant, e.g. a text length tied to its position table)."""
    dims = {i.name: list(i.type.tensor_type.shape.dim) for i in graph.graph.input}
    for input_name, wanted in axes.items():
        for axis, label in wanted.items():
            dim = dims[input_name][axis]
            if not dim.dim_param:
                raise VlkitError(f"{name}: the {what} exports only with a fixed {label} ({input_name} axis {axis} "
                                 f"is {dim.dim_value} in the ONNX graph, not dynamic)")


def _compare(session: Any, feeds: dict[str, Tensor], expected: Tensor, what: str, name: str) -> float:
    try:
        out = session.run(None, {k: v.numpy() for k, v in feeds.items()})[0]
    except Exception as exc:  # onnxruntime's own error classes
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        shape = "x".join(str(d) for d in next(iter(feeds.values())).shape)
        raise VlkitError(f"{name}: the ONNX {what} does not run in onnxruntime on a {shape} batch "
                         f"({first[:300]})") from None
    if out.shape != tuple(expected.shape):
        return float("inf")
    return float(abs(torch.from_numpy(out) - expected).max())


def export_onnx(loaded: Any, out: str | Path, opset: int = DEFAULT_OPSET, *, inputs: Iterable[str | Path] = (),
                what: str | None = None, tolerance: float = TOLERANCE, seed: int = 0,
                card: bool = True) -> ExportReport:
    """Export ``loaded``'s image and text encoders to ONNX files in ``out``, checked with onnxruntime.

    Args:
        loaded: a :class:`~vlkit.inference.loading.LoadedModel` whose model has ``encode_image``/``encode_text``.
        out: the folder to write: new, empty or an earlier vlkit export (replaced whole).
        opset: the ONNX opset (at least :data:`MIN_OPSET`).
        inputs: paths the command read (never written over).
        what: how the user named ``out``, for messages.
        tolerance: the largest absolute difference to PyTorch accepted.
        seed: seed of the random check batches.
        card: write the model card (``README.md``; :mod:`vlkit.export.card`).

    Returns:
        The report written to ``export.json``.

    Raises:
        VlkitError: onnx/onnxruntime missing, an opset below the minimum, a model without the encoders, an
            encoder that does not export (naming the model and the encoder) or whose outputs differ from
            PyTorch's by more than ``tolerance``; ``out`` is then left as it was.
    """
    onnx, ort = require_onnx()
    model, name = loaded.model.eval(), getattr(loaded.model, "architecture", type(loaded.model).__name__)
    if opset < MIN_OPSET:
        raise VlkitError(f"--opset {opset}: torch's ONNX exporter writes opset {MIN_OPSET} or later")
    for method in ("encode_image", "encode_text"):
        if not callable(getattr(model, method, None)):
            raise VlkitError(f"{name}: the model has no {method}; only models with image and text encoders export")
    if loaded.tokenizer is None:
        raise VlkitError(f"{name}: no tokenizer saved with the model ({loaded.source}); the text encoder "
                         "cannot be checked without one")
    from vlkit.export.card import CARD_FILE, model_card, read_training

    record = read_training(loaded.source) if card else None  # read and checked before anything is written
    pre = model.preprocess
    size, context = int(pre.image_size), int(pre.context_length)
    gen = torch.Generator().manual_seed(seed)
    trace_len = min(8, context)
    check_lens = sorted({min(5, context), context})
    batch = torch.export.Dim("batch", min=1, max=4096)
    length = torch.export.Dim("length", min=2, max=context) if context > 2 else None
    with atomic_directory(out, EXPORT_KIND, inputs=inputs, what=what) as tmp, torch.no_grad():
        pixels = torch.randn(2, 3, size, size, generator=gen)  # [batch, 3, S, S]
        _export(ImageEncoder(model), (pixels,), tmp / IMAGE_FILE, ["pixels"], "image_embeds",
                {"pixels": {0: batch}}, opset, "image encoder", name)
        text = _text_batch(loaded.tokenizer, 2, trace_len, gen)
        text_axes = {0: batch, 1: length} if length is not None else {0: batch}
        _export(TextEncoder(model), (text["input_ids"], text["attention_mask"]), tmp / TEXT_FILE,
                ["input_ids", "attention_mask"], "text_embeds",
                {"input_ids": text_axes, "attention_mask": text_axes}, opset, "text encoder", name)
        text_names = {0: "batch", 1: "length"} if length is not None else {0: "batch"}
        for file, part, axes in [(IMAGE_FILE, "image encoder", {"pixels": {0: "batch"}}),
                                 (TEXT_FILE, "text encoder", {"input_ids": text_names, "attention_mask": text_names})]:
            graph = onnx.load(str(tmp / file))
            written = {o.domain or "ai.onnx": o.version for o in graph.opset_import}
            if written.get("ai.onnx") != opset:
                raise VlkitError(f"{name}: asked for opset {opset}, the exporter wrote {written.get('ai.onnx')}")
            _check_axes(graph, axes, part, name)
        diffs = {"image": 0.0, "text": 0.0}
        image_session = ort.InferenceSession(str(tmp / IMAGE_FILE), providers=["CPUExecutionProvider"])
        text_session = ort.InferenceSession(str(tmp / TEXT_FILE), providers=["CPUExecutionProvider"])
        for n in CHECK_BATCHES:
            pixels = torch.randn(n, 3, size, size, generator=gen)
            diffs["image"] = max(diffs["image"], _compare(image_session, {"pixels": pixels},
                                                          model.encode_image(pixels), "image encoder", name))
            for text_len in check_lens:
                feeds = _text_batch(loaded.tokenizer, n, text_len, gen)
                diffs["text"] = max(diffs["text"], _compare(text_session, feeds, model.encode_text(**feeds),
                                                                "text encoder", name))
        worst = max(diffs, key=diffs.get)
        if not diffs[worst] <= tolerance:
            raise VlkitError(f"{name}: the ONNX {worst} encoder differs from PyTorch by {diffs[worst]:.3g} "
                             f"(max abs, tolerance {tolerance:g}); nothing written")
        dim = int(model.encode_image(pixels[:1]).shape[-1])
        loaded.tokenizer.save(tmp / TOKENIZER_FILE)
        report = ExportReport(
            format="onnx", model=name, fingerprint=loaded.tag, source=str(loaded.source), opset=opset,
            embed_dim=dim,
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
                     REPORT_FILE: f"opset {opset}, shapes, preprocessing and the check's figures"}
            (tmp / CARD_FILE).write_text(model_card(loaded, "onnx", record, files, diffs), encoding="utf-8")
    return report
