"""Export: a trained model's encoders in formats other tools run.

- :mod:`vlkit.export.onnx`: both encoders as ONNX files, checked with onnxruntime;
- :mod:`vlkit.export.torchscript`: both encoders as TorchScript files (``torch.jit.load``, no vlkit needed);
- :mod:`vlkit.export.hf`: a CLIP as a transformers ``CLIPModel`` folder (the families that map onto no
  transformers class are refused);
- :mod:`vlkit.export.card`: the model card (``README.md``) written into every export folder;
- :mod:`vlkit.export.onnx_runtime`: queries embedded by onnxruntime (``vlkit serve --runtime onnx``).
"""
