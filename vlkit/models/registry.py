"""The model registry: named builders, ``create_model`` and ``list_models``."""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any, Callable

from torch import nn

from vlkit.errors import VlkitError

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a builder under ``name`` (names are unique)."""

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _BUILDERS:
            raise ValueError(f"model '{name}' is already registered")
        _BUILDERS[name] = builder
        return builder

    return wrap


def _load_families() -> None:
    # importing a family registers its named sizes
    from vlkit.models import albef, blip, blip2, brivl, captioner, clip, coca, mae, vilt, vlmo  # noqa: F401
    from vlkit.models import timesformer  # noqa: F401
    from vlkit.models import beit, vqvae  # noqa: F401


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style ``pattern``, sorted."""
    _load_families()
    return sorted(n for n in _BUILDERS if fnmatch.fnmatch(n, pattern))


def create_model(name: str, pretrained: str | Path | None = None, **overrides: Any) -> nn.Module:
    """Build a registered model, optionally with weights.

    Args:
        name: a name from :func:`list_models`.
        pretrained: a vlkit model directory, or a foreign checkpoint the family can convert (for CLIP: an
            OpenAI state dict, an open_clip checkpoint or a Hugging Face ``CLIPModel`` directory).
        overrides: builder arguments that replace the named size's values.

    Raises:
        VlkitError: unknown name, or weights that do not fit.
    """
    _load_families()
    if name not in _BUILDERS:
        near = fnmatch.filter(_BUILDERS, f"*{name.split('-')[0]}*")
        raise VlkitError(f"unknown model '{name}'" + (f"; did you mean one of {sorted(near)}?" if near else
                         f"; available: {sorted(_BUILDERS)}"))
    model = _BUILDERS[name](**overrides)
    if pretrained is not None:
        load_weights = getattr(model, "load_pretrained", None)
        if load_weights is None:
            from vlkit.models.io import load_state_into

            load_state_into(model, pretrained)
        else:
            load_weights(pretrained)
    return model
