"""Seeing what a model sees: images imagined from a text (:mod:`~vlkit.explain.imagine`), heat maps of where an
image matches a text (:mod:`~vlkit.explain.gradcam`), the weight of each word (:mod:`~vlkit.explain.words`) and
the figures that show them (:mod:`~vlkit.explain.figures`)."""
