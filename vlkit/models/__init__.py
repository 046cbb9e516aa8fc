"""Models: one folder per family, a registry, and saving/loading with safetensors + JSON."""

from vlkit.models.io import load_model, save_model
from vlkit.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model", "load_model", "save_model"]
