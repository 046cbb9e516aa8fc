"""VQ-VAE named sizes and loading a trained tokenizer: ``vqvae-tiny`` (32 px, 4x4 tokens of 64 codes: tests)
and ``vqvae-small`` (64 px, 8x8 tokens of 128 codes: the shipped recipe)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlkit.errors import VlkitError
from vlkit.models.io import CONFIG_NAME, config_from_dict, load_state_into, read_config
from vlkit.models.registry import register_model
from vlkit.models.vqvae.model import VQVAE, VQVAEConfig


def vqvae(**fields: Any) -> VQVAE:
    """A VQ-VAE from :class:`VQVAEConfig` fields (a nested ``preprocess`` as a dict is accepted)."""
    return VQVAE(config_from_dict(VQVAEConfig, fields, "vqvae"))


@register_model("vqvae-tiny")
def vqvae_tiny(**overrides: Any) -> VQVAE:
    """For tests: 32 px images, 3 halvings (4x4 tokens, one per 8x8 patch), 64 codes of 16 values."""
    sizes = dict(channels=32, downsample=3, res_blocks=1, code_dim=16, num_codes=64, restart_after=20,
                 preprocess=dict(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), context_length=1))
    return vqvae(**{**sizes, **overrides})


@register_model("vqvae-small")
def vqvae_small(**overrides: Any) -> VQVAE:
    """64 px images, 3 halvings (8x8 tokens, one per 8x8 patch), 128 codes of 32 values."""
    sizes = dict(channels=64, downsample=3, res_blocks=2, code_dim=32, num_codes=128, restart_after=50,
                 preprocess=dict(image_size=64, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), context_length=1))
    return vqvae(**{**sizes, **overrides})


def load_vqvae(path: str | Path) -> VQVAE:
    """A trained VQ-VAE from a run directory (its ``model/``) or a model directory written by ``save_model``.

    Raises:
        VlkitError: no vlkit model there, a model of another architecture, or weights that do not fit.
    """
    path = Path(path)
    model_dir = path / "model" if (path / "model" / CONFIG_NAME).exists() else path
    meta = read_config(model_dir)
    if meta.get("architecture") != VQVAE.architecture:
        raise VlkitError(f"{model_dir}: a {meta.get('architecture')!r} model, not a VQ-VAE tokenizer (vqvae-*)")
    model = VQVAE(config_from_dict(VQVAEConfig, meta.get("config", {}), f"{model_dir}/{CONFIG_NAME}"))
    load_state_into(model, model_dir)
    return model.eval()


__all__ = ["load_vqvae", "vqvae", "vqvae_small", "vqvae_tiny"]
