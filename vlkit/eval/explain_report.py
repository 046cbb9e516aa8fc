"""The eval report's heat maps: where each of the top-5 images of a query caption matches it."""

from __future__ import annotations

import html
import io
from pathlib import Path
from typing import Sequence

import numpy as np

FIGURE_NAME = "explanations.png"


def explanations_figure(model_dir: str | Path, caption: str, thumbnails: Sequence[np.ndarray],
                        scores: Sequence[float], out: Path) -> str:
    """Draw the heat map of ``caption`` over each thumbnail into ``out/explanations.png``.

    Args:
        model_dir: the evaluated model (loaded again here, once).
        caption: the query caption.
        thumbnails: RGB uint8 ``[h, w, 3]`` thumbnails of its top images, best first.
        scores: their cosine similarities.
        out: the report folder being written.

    Returns:
        The HTML of the figure, or ``""`` when the model has no two towers to explain.
    """
    from PIL import Image

    from vlkit.explain.figures import grid, overlay
    from vlkit.explain.gradcam import explain
    from vlkit.inference.embed import can_embed
    from vlkit.inference.loading import load_for_inference

    from vlkit.errors import VlkitError

    try:
        loaded = load_for_inference(model_dir)
    except VlkitError:  # an ONNX export, say: nothing to take gradients of
        return ""
    if not can_embed(loaded.model) or not hasattr(loaded.model, "LR_GROUPS"):
        return ""
    transform = loaded.model.preprocess.image_transform(train=False)
    squares, pictures = [], []
    for thumb in thumbnails:
        image = Image.fromarray(np.asarray(thumb, dtype=np.uint8), mode="RGB")
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        result = explain(loaded.model, loaded.tokenizer, transform.normalize(transform(buf.getvalue())[None]),
                         caption)
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        squares.append(image.crop((left, top, left + side, top + side)))
        pictures.append(overlay(squares[-1], result.heat.numpy()))
    labels = [f"#{i + 1}  {s:.3f}" for i, s in enumerate(scores)]
    grid(squares + pictures, labels + ["heat map"] * len(pictures), columns=len(pictures),
         cell=200).save(out / FIGURE_NAME)
    text = (f"The top {len(pictures)} images for “{caption}” (cosine similarity) and, beneath, where each matches "
            "it (Grad-CAM of the similarity).")
    return (f'<figure><img src="{FIGURE_NAME}" alt="{html.escape(text)}">'
            f"<figcaption>{html.escape(text)}</figcaption></figure>")
