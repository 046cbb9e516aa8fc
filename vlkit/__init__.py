"""vlkit: vision-language models from raw image-text data to a trained, searchable model."""

__version__ = "0.1.0"
