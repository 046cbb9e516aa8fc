"""VQ-VAE image tokenizers: images to grids of code ids and back."""

from vlkit.models.vqvae import builders  # noqa: F401  (registers the named sizes)
from vlkit.models.vqvae.builders import load_vqvae
from vlkit.models.vqvae.model import VQVAE, VQVAEConfig, VQVAEOutput, vqvae_loss

__all__ = ["VQVAE", "VQVAEConfig", "VQVAEOutput", "load_vqvae", "vqvae_loss"]
