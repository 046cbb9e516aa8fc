"""Load a trained model for inference from a run directory, a model directory or a checkpoint."""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from vlkit.errors import VlkitError
from vlkit.inference.defaults import GenerationDefaults, defaults_from_tasks, load_defaults
from vlkit.models.io import CONFIG_NAME, WEIGHTS_NAME, SavedClassifier, load_classifier, load_model, load_tokenizer


@dataclass
class LoadedModel:
    """A model ready for ``encode_image`` / ``encode_text``, with what it came from.

    Attributes:
        model: the model, in eval mode.
        tokenizer: its tokenizer.
        source: the directory the weights were read from.
        tag: a short fingerprint of the weights (first 12 hex digits of their SHA-256), written beside
            embeddings so that they can be traced to the model that made them.
        generation: how the model writes by default (the prompt and decoding its training run used).
        precision: what embeddings are computed in: ``auto`` (bf16 autocast where the hardware has native
            bf16, else fp32), ``fp32`` or ``bf16`` (see :mod:`vlkit.inference.speed`).
        classifier: the classification head trained with the model (task ``classification``), or None.
    """

    model: nn.Module
    tokenizer: Any
    source: Path
    tag: str
    generation: GenerationDefaults = field(default_factory=GenerationDefaults)
    precision: str = "auto"
    classifier: SavedClassifier | None = None

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.embed_dim)

    @property
    def device(self) -> torch.device:
        """Where the model's weights are."""
        return next(iter(self.model.parameters()), torch.empty(0)).device

    @property
    def resolved_precision(self) -> str:
        """``fp32`` or ``bf16``: :attr:`precision` with ``auto`` decided for this machine."""
        from vlkit.inference.speed import resolve_precision

        return resolve_precision(self.precision, self.device)

    @contextlib.contextmanager
    def inference(self) -> Iterator[None]:
        """Inference mode, with bf16 autocast when :attr:`resolved_precision` says so."""
        from vlkit.inference.speed import autocast

        with torch.inference_mode(), autocast(self.resolved_precision, self.device):
            yield


def _fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def load_for_inference(path: str | Path, runtime: str = "torch") -> LoadedModel:
    """Load ``path``: a run directory (its ``model/``, or ``model_ema/`` is not used), a model directory
    (``config.json`` + ``model.safetensors``), or a training checkpoint (``checkpoints/step-N``,
    ``checkpoints/best``, ``checkpoints/latest``) rebuilt from its run's ``config.yaml``.

    Args:
        path: the run, model directory or checkpoint.
        runtime: ``torch``, or ``onnx``: encoders run by onnxruntime (``encode_image``/``encode_text`` only),
            from a ``vlkit export --format onnx`` folder or from any of the above exported at load time
            (:func:`vlkit.export.onnx_runtime.load_onnx`).

    Raises:
        VlkitError: the path does not exist or holds none of these; an unknown runtime.
    """
    if runtime != "torch":
        from vlkit.export.onnx_runtime import check_runtime, load_onnx

        check_runtime(runtime)
        if not Path(path).exists():
            raise VlkitError(f"{path}: no such run, model, checkpoint or ONNX export")
        return load_onnx(path)
    path = Path(path)
    if not path.exists():
        raise VlkitError(f"{path}: no such run, model or checkpoint")
    if (path / CONFIG_NAME).exists():
        model = load_model(path)
        return LoadedModel(model.eval(), load_tokenizer(path, model), path, _fingerprint(path / WEIGHTS_NAME),
                           load_defaults(path), classifier=load_classifier(path))
    if (path / "model" / CONFIG_NAME).exists():
        return load_for_inference(path / "model")
    if path.name == "latest" and path.parent.name == "checkpoints":
        if path.is_file():
            path = path.parent / path.read_text().strip()
    if (path / "state.pt").exists():
        return _load_checkpoint(path)
    if (path / "checkpoints").is_dir():
        raise VlkitError(f"{path}: the run has no final model yet (no {path / 'model'}); "
                         f"pass one of its checkpoints, e.g. {path / 'checkpoints' / 'best'}")
    raise VlkitError(f"{path}: not a vlkit run, model directory or checkpoint (no {CONFIG_NAME}, model/ or state.pt)")


def _load_checkpoint(path: Path) -> LoadedModel:
    from vlkit.config.load import load_config
    from vlkit.train.checkpoint import STATE_NAME, load_checkpoint
    from vlkit.train.distributed import DistInfo
    from vlkit.train.model_setup import build_model_and_tokenizer

    run_dir = path.parent.parent
    config = run_dir / "config.yaml"
    if not config.exists():
        raise VlkitError(f"{path}: checkpoint without its run's config ({config} is missing)")
    state = load_checkpoint(path)  # checked against its manifest; tensors and plain values only
    cfg = load_config(config)
    model, tokenizer = build_model_and_tokenizer(cfg, DistInfo())
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as exc:
        raise VlkitError(f"{path}: checkpoint does not match {config}: {str(exc).splitlines()[0]}") from None
    return LoadedModel(model.eval(), tokenizer, path, _fingerprint(path / STATE_NAME),
                       defaults_from_tasks(cfg.tasks) or GenerationDefaults(),
                       classifier=_checkpoint_classifier(cfg, state, path))


def _checkpoint_classifier(cfg, state: dict, path: Path) -> SavedClassifier | None:
    """The first classification task's head in a checkpoint (as the final model saves it), or None."""
    from vlkit.tasks.labels import dataset_classes

    for task, saved in zip(cfg.tasks, state.get("tasks") or []):
        if task.name != "classification" or "head.weight" not in saved:
            continue
        weight, bias = saved["head.weight"], saved["head.bias"]
        head = nn.Linear(weight.shape[1], weight.shape[0])
        head.load_state_dict({"weight": weight.float(), "bias": bias.float()})
        names = dataset_classes(cfg.datasets[task.dataset].path)
        if len(names) != weight.shape[0]:
            raise VlkitError(f"{path}: the classification head has {weight.shape[0]} classes but its dataset "
                             f"{cfg.datasets[task.dataset].path} now has {len(names)}")
        return SavedClassifier(head.eval(), names, task.prompt)
    return None
