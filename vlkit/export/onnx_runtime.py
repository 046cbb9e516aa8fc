"""Queries embedded by onnxruntime instead of PyTorch (``vlkit serve/search --runtime onnx``).

:class:`OnnxEncoders` offers what a search needs of a model (``encode_image``, ``encode_text``, ``preprocess``,
``config.embed_dim``) on top of two onnxruntime sessions. :func:`load_onnx` makes one from a folder written by
``vlkit export --format onnx`` (the PyTorch weights are then not needed), or from a run, model folder or
checkpoint by exporting it into a temporary folder first (checked against PyTorch as ``vlkit export`` checks
it). onnxruntime is an optional dependency (the ``onnx`` extra); its absence is one line saying so.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor

from vlkit.errors import DataError, VlkitError

RUNTIMES = ("torch", "onnx")
EXPORT_JSON = "export.json"


def require_onnxruntime() -> Any:
    """Import ``onnxruntime``, or raise one line naming the extra to install."""
    try:
        import onnxruntime
    except ImportError:
        raise VlkitError("--runtime onnx needs onnxruntime: pip install 'vlkit[onnx]'") from None
    return onnxruntime


@dataclass
class OnnxConfig:
    """The part of a model's config a search reads."""

    embed_dim: int


class OnnxEncoders:
    """A model's two encoders run by onnxruntime, with the interface a search uses.

    Args:
        image_session: onnxruntime session of ``image_encoder.onnx`` (``pixels`` -> ``image_embeds``).
        text_session: session of ``text_encoder.onnx`` (``input_ids``, ``attention_mask`` -> ``text_embeds``).
        preprocess: the image size, normalisation and context length the model expects.
        embed_dim: width of the embeddings.
        architecture: the exported model's family (``clip``, ``brivl``, ...).
    """

    def __init__(self, image_session: Any, text_session: Any, preprocess: Any, embed_dim: int,
                 architecture: str) -> None:
        self.image_session = image_session
        self.text_session = text_session
        self.preprocess = preprocess
        self.config = OnnxConfig(embed_dim)
        self.architecture = architecture

    def eval(self) -> "OnnxEncoders":
        """Nothing to switch (the sessions only infer); here so that it stands where a model does."""
        return self

    def parameters(self) -> Iterator[Tensor]:
        """No PyTorch parameters (the weights are in the sessions): code that asks where a model's weights
        are finds none, so it takes the CPU."""
        return iter(())

    def encode_image(self, pixels: Tensor) -> Tensor:
        """``[batch, 3, S, S]`` normalised pixels -> L2-normalised ``[batch, embed_dim]``."""
        feeds = {"pixels": pixels.detach().to(torch.float32).contiguous().numpy()}
        return torch.from_numpy(self.image_session.run(None, feeds)[0])

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """``[batch, length]`` token ids (and mask) -> L2-normalised ``[batch, embed_dim]``."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        feeds = {"input_ids": input_ids.to(torch.int64).contiguous().numpy(),
                 "attention_mask": attention_mask.to(torch.int64).contiguous().numpy()}
        return torch.from_numpy(self.text_session.run(None, feeds)[0])


def is_onnx_export(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by ``vlkit export --format onnx`` (its ``export.json`` says so)."""
    meta = Path(path) / EXPORT_JSON
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text(encoding="utf-8")).get("format") == "onnx"
    except (OSError, ValueError, AttributeError):
        return True  # claims to be an export; load_onnx_export reports what is wrong with it


def _get(data: dict, key: str, kind: type | tuple[type, ...], where: Path) -> Any:
    value = data.get(key) if isinstance(data, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DataError(f"{where}: '{key}' is missing or not a {getattr(kind, '__name__', 'value')}")
    return value


def _file_in(root: Path, name: Any, key: str, where: Path) -> Path:
    """``root/name`` for a plain file name inside ``root`` (no folders, no links out of it)."""
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise DataError(f"{where}: '{key}' must be a file name inside the folder, not {name!r}")
    path = root / name
    if not path.is_file() or path.is_symlink():
        raise DataError(f"{where}: '{key}' names {name}, which is not a file in {root}")
    return path


def _read_export(root: Path) -> dict[str, Any]:
    """The checked contents of ``root/export.json``."""
    where = root / EXPORT_JSON
    try:
        data = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{where}: not readable JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != "onnx":
        raise DataError(f"{where}: not an ONNX export ('format' is not 'onnx')")
    pre = _get(data, "preprocess", dict, where)
    out = {
        "model": _get(data, "model", str, where), "fingerprint": _get(data, "fingerprint", str, where),
        "embed_dim": _get(data, "embed_dim", int, where),
        "image_file": _file_in(root, _get(data, "image", dict, where).get("file"), "image.file", where),
        "text_file": _file_in(root, _get(data, "text", dict, where).get("file"), "text.file", where),
        "tokenizer": _file_in(root, pre.get("tokenizer"), "preprocess.tokenizer", where),
        "image_size": _get(pre, "image_size", int, where), "context_length": _get(pre, "context_length", int, where),
    }
    for key in ("mean", "std"):
        values = pre.get(key)
        if not (isinstance(values, list) and len(values) == 3
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
            raise DataError(f"{where}: 'preprocess.{key}' must be three numbers")
        out[key] = tuple(float(v) for v in values)
    if min(out["embed_dim"], out["image_size"], out["context_length"]) < 1 or min(out["std"]) <= 0:
        raise DataError(f"{where}: embed_dim, image_size, context_length and std must be positive")
    return out


def _session(ort: Any, path: Path, inputs: list[str], where: Path) -> Any:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own error classes
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"{path}: onnxruntime cannot load it ({first[:300]})") from None
    names = [i.name for i in session.get_inputs()]
    if names != inputs:
        raise DataError(f"{path}: inputs {names}, expected {inputs} (as {where.name} describes)")
    return session


def load_onnx_export(path: str | Path) -> Any:
    """Load a folder written by ``vlkit export --format onnx``.

    Returns:
        A :class:`~vlkit.inference.loading.LoadedModel` whose model is an :class:`OnnxEncoders`, tagged with the
        fingerprint of the weights it was exported from.

    Raises:
        DataError: ``export.json`` or a file it names is missing, malformed or outside the folder.
        VlkitError: onnxruntime is not installed.
    """
    from vlkit.data.text import TextTokenizer
    from vlkit.inference.loading import LoadedModel
    from vlkit.models.preprocess import Preprocess

    ort = require_onnxruntime()
    root = Path(path)
    meta = _read_export(root)
    where = root / EXPORT_JSON
    tokenizer = TextTokenizer(meta["tokenizer"], max_length=meta["context_length"])
    preprocess = Preprocess(image_size=meta["image_size"], mean=meta["mean"], std=meta["std"],
                            context_length=meta["context_length"], tokenizer=str(meta["tokenizer"]))
    encoders = OnnxEncoders(_session(ort, meta["image_file"], ["pixels"], where),
                            _session(ort, meta["text_file"], ["input_ids", "attention_mask"], where),
                            preprocess, meta["embed_dim"], meta["model"])
    return LoadedModel(encoders, tokenizer, root, meta["fingerprint"])


def onnx_from_torch(loaded: Any) -> Any:
    """Export a PyTorch :class:`~vlkit.inference.loading.LoadedModel` to ONNX in a temporary folder (checked
    against PyTorch to 1e-4) and load it back; the temporary folder is removed once the sessions hold the files.

    Returns:
        A ``LoadedModel`` with the same source, fingerprint and generation defaults, embedding with onnxruntime.
    """
    from dataclasses import replace

    from vlkit.export.onnx import export_onnx, require_onnx

    require_onnx()
    with tempfile.TemporaryDirectory(prefix="vlkit-onnx-") as tmp:
        export_onnx(loaded, Path(tmp) / "onnx", card=False)
        encoders = load_onnx_export(Path(tmp) / "onnx").model
    encoders.preprocess.tokenizer = loaded.model.preprocess.tokenizer  # not the temporary copy
    return replace(loaded, model=encoders)


def load_onnx(path: str | Path) -> Any:
    """What ``load_for_inference(path, runtime="onnx")`` returns: an ONNX export folder as it is, or a run,
    model folder or checkpoint exported to ONNX at load time.

    Raises:
        VlkitError: onnxruntime (or, to export, onnx and onnxscript) missing, or what loading the model raises.
    """
    if is_onnx_export(path):
        return load_onnx_export(path)
    from vlkit.export.onnx import require_onnx
    from vlkit.inference.loading import load_for_inference

    require_onnx()  # before the PyTorch model is loaded
    return onnx_from_torch(load_for_inference(path))


def check_runtime(runtime: str) -> str:
    """``runtime`` when it is one of :data:`RUNTIMES`, else a :class:`VlkitError` naming them."""
    if runtime not in RUNTIMES:
        raise VlkitError(f"runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
    return runtime
