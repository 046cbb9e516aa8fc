"""Using a trained model: decoding text (:mod:`vlkit.inference.generate`) and the interface a model with a text
decoder exposes for it (:mod:`vlkit.inference.interface`)."""
