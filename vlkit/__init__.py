"""vlkit: vision-language models from raw image-text data to a trained, searchable model."""

__version__ = "0.1.0"


def create_model(name, pretrained=None, **overrides):
    """Build a registered model; see :func:`vlkit.models.registry.create_model`."""
    from vlkit.models.registry import create_model as _create

    return _create(name, pretrained, **overrides)


def list_models(pattern="*"):
    """Registered model names matching ``pattern``; see :func:`vlkit.models.registry.list_models`."""
    from vlkit.models.registry import list_models as _list

    return _list(pattern)
