"""Initialising a ViT image tower (CLIP, ALBEF ... ``visual.*``) from a pre-trained MAE or BEiT encoder
(``model.pretrained_image=RUN``).

Both encoders are a :class:`~vlkit.modules.encoders.vit.VisionTransformer`, so the key map is a change of prefix:
``encoder.<key>`` of the MAE (or BEiT) becomes ``visual.<key>`` of the target (and of its momentum copy, where it has one).
Every key of the target tower must be found with the same shape; otherwise one error line names the first key
that differs and both shapes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from vlkit.errors import VlkitError

SOURCE_PREFIX = "encoder."
#: the masked-image-modelling models whose ``encoder`` is a plain ViT
SOURCE_ARCHITECTURES = ("mae", "beit")
TARGET_TOWER = "visual"


def _model_dir(path: Path) -> Path:
    from vlkit.models.io import CONFIG_NAME

    if (path / "model" / CONFIG_NAME).exists():  # a run directory
        return path / "model"
    if (path / CONFIG_NAME).exists():
        return path
    raise VlkitError(f"model.pretrained_image: {path}: not an MAE or BEiT run or model directory "
                     f"(no {CONFIG_NAME})")


def mae_encoder_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The encoder weights (``encoder.`` prefix removed) of a saved MAE or BEiT run or model directory.

    Raises:
        VlkitError: the directory is not a saved MAE or BEiT model.
    """
    from safetensors.torch import load_file

    from vlkit.models.io import CONFIG_NAME, WEIGHTS_NAME

    directory = _model_dir(Path(path))
    try:
        arch = json.loads((directory / CONFIG_NAME).read_text()).get("architecture")
    except (OSError, ValueError) as exc:
        raise VlkitError(f"model.pretrained_image: {directory / CONFIG_NAME}: unreadable ({exc})") from None
    if arch not in SOURCE_ARCHITECTURES:
        raise VlkitError(f"model.pretrained_image: {directory} holds a {arch!r} model, not an MAE (mae-*) or a "
                         "BEiT (beit-*)")
    file = directory / WEIGHTS_NAME
    if not file.exists():
        raise VlkitError(f"model.pretrained_image: {directory}: no weights ({WEIGHTS_NAME} missing)")
    state = load_file(str(file))
    return {k[len(SOURCE_PREFIX):]: v for k, v in state.items() if k.startswith(SOURCE_PREFIX)}


def load_pretrained_image(model: nn.Module, path: str | Path) -> list[str]:
    """Copy an MAE encoder into ``model.visual`` (and the momentum copy of ``visual`` if the model has one).

    Args:
        model: a model whose image tower ``visual`` is a ViT (clip-*, albef-*, ...).
        path: an MAE run or model directory.

    Returns:
        The names of the target parameters and buffers that were set.

    Raises:
        VlkitError: the model has no ViT image tower, or a key is missing or has another shape (one line).
    """
    from vlkit.modules.encoders.vit import VisionTransformer

    tower = getattr(model, TARGET_TOWER, None)
    if not isinstance(tower, VisionTransformer):
        raise VlkitError(f"model.pretrained_image: {type(model).__name__} has no ViT image tower "
                         f"('{TARGET_TOWER}') to initialise from an MAE encoder")
    source = mae_encoder_state(path)
    own = tower.state_dict()
    for key, value in own.items():
        if key not in source:
            raise VlkitError(f"model.pretrained_image: {path}: the MAE encoder has no '{SOURCE_PREFIX}{key}' for "
                             f"'{TARGET_TOWER}.{key}'")
        if tuple(source[key].shape) != tuple(value.shape):
            raise VlkitError(f"model.pretrained_image: {path}: '{SOURCE_PREFIX}{key}' has shape "
                             f"{tuple(source[key].shape)} but '{TARGET_TOWER}.{key}' has {tuple(value.shape)}; "
                             "the MAE and the image tower must have the same width, layers, patch and image size")
    state = {k: source[k] for k in own}
    tower.load_state_dict(state, strict=True)
    names = [f"{TARGET_TOWER}.{k}" for k in state]
    momentum = getattr(model, "momentum_encoders", None)
    if momentum is not None and TARGET_TOWER in momentum:
        momentum[TARGET_TOWER].load_state_dict(state, strict=True)
        names += [f"momentum_encoders.{TARGET_TOWER}.{k}" for k in state]
    return names
