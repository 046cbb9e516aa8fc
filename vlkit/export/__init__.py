"""Export: a trained model's encoders in formats other tools run (ONNX, :mod:`vlkit.export.onnx`)."""
