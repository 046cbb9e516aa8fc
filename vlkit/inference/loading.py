"""Load a trained model for inference from a run directory, a model directory or a checkpoint."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from vlkit.errors import VlkitError
from vlkit.inference.defaults import GenerationDefaults, defaults_from_tasks, load_defaults
from vlkit.models.io import CONFIG_NAME, WEIGHTS_NAME, load_model, load_tokenizer


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
    """

    model: nn.Module
    tokenizer: Any
    source: Path
    tag: str
    generation: GenerationDefaults = field(default_factory=GenerationDefaults)

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.embed_dim)


def _fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def load_for_inference(path: str | Path) -> LoadedModel:
    """Load ``path``: a run directory (its ``model/``, or ``model_ema/`` is not used), a model directory
    (``config.json`` + ``model.safetensors``), or a training checkpoint (``checkpoints/step-N``,
    ``checkpoints/best``, ``checkpoints/latest``) rebuilt from its run's ``config.yaml``.

    Raises:
        VlkitError: the path does not exist or holds none of these.
    """
    path = Path(path)
    if not path.exists():
        raise VlkitError(f"{path}: no such run, model or checkpoint")
    if (path / CONFIG_NAME).exists():
        model = load_model(path)
        return LoadedModel(model.eval(), load_tokenizer(path, model), path, _fingerprint(path / WEIGHTS_NAME),
                           load_defaults(path))
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
                       defaults_from_tasks(cfg.tasks) or GenerationDefaults())
