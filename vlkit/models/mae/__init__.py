"""The MAE family: masked-autoencoder pre-training of a ViT image encoder."""

from vlkit.models.mae import builders  # noqa: F401  (registers the named sizes)
from vlkit.models.mae.model import MAE, MAEConfig, MAEOutput

__all__ = ["MAE", "MAEConfig", "MAEOutput"]
