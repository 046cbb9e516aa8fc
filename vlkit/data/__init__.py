"""Data: ingest readers, the Lance store, PyTorch datasets, samplers, transforms, synthetic data."""
