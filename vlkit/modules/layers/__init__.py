"""Layers: attention, transformer blocks, MLP, patch and position embeddings, pooling."""
