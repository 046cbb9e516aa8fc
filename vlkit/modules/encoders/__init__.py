"""Encoders: ViT, text transformer, EfficientNet-Lite, Hugging Face text encoders."""
