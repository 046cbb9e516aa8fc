"""Heat maps of where an image matches a text.

For two-tower models the score is the cosine similarity of the two embeddings. A CNN tower gets Grad-CAM
(Selvaraju et al. 2017) on its last feature map: each channel weighted by the mean of its gradient, summed, the
negative part cut. A ViT tower gets the same on its patch tokens entering the last block, where the class token
gathers them by attention: each token's gradient x activation summed over the width (the gradient-weighted
tokens the last attention reads), negative part cut. The map is upsampled bilinearly to the image.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlkit.errors import VlkitError
from vlkit.explain.towers import gradients_through, tap_feature_map
from vlkit.explain.words import WordWeight, tap_token_embeddings, word_weights


@dataclass
class Explanation:
    """Where and why an image matches a text.

    Attributes:
        heat: ``[H, W]`` heat map over the model's input image, in [0, 1] (all zeros when nothing raises the
            similarity).
        score: the cosine similarity of the image and the text.
        words: each token of the text with its contribution (gradient x input).
        method: ``gradcam`` (CNN feature map) or ``token-gradcam`` (ViT patch tokens).
    """

    heat: Tensor
    score: float
    words: list[WordWeight] = field(default_factory=list)
    method: str = ""


def cam_from_map(activation: Tensor, gradient: Tensor, per_position: bool) -> Tensor:
    """Grad-CAM of one image from its feature map and the gradient of the score with respect to it.

    Args:
        activation: ``[channels, h, w]``.
        gradient: ``[channels, h, w]``.
        per_position: weight each position by its own gradient (gradient x activation, for tokens) instead of
            each channel by its mean gradient (classic Grad-CAM, for convolution maps).

    Returns:
        ``[h, w]``, non-negative.
    """
    if per_position:
        cam = (gradient * activation).sum(0)
    else:
        cam = (gradient.mean(dim=(1, 2), keepdim=True) * activation).sum(0)
    return cam.clamp(min=0)


def explain(model: nn.Module, tokenizer, pixels: Tensor, text: str) -> Explanation:
    """The heat map and word weights of one image and one text.

    Args:
        model: a two-tower model (``encode_image``/``encode_text``), in eval mode.
        tokenizer: its tokenizer.
        pixels: the normalised image ``[3, S, S]`` or ``[1, 3, S, S]`` as the model takes it.
        text: the text.

    Returns:
        An :class:`Explanation` whose heat map has the image's size.

    Raises:
        VlkitError: the model does not embed both images and texts, or its tower hides its feature map.
    """
    from vlkit.inference.embed import require_embeddings

    require_embeddings(model, "an explanation")
    if not isinstance(model, nn.Module) or next(iter(model.parameters()), None) is None:
        raise VlkitError("explanations take gradients through the model: they need the PyTorch runtime")
    if pixels.dim() == 3:
        pixels = pixels[None]
    device = next(model.parameters()).device
    pixels = pixels.to(device).float().requires_grad_(True)  # so that a frozen tower's maps join the graph
    tokens = tokenizer([text.strip()])
    input_ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
    size = tuple(pixels.shape[-2:])
    with torch.enable_grad(), gradients_through(model), tap_feature_map(model, size) as fmap, \
            tap_token_embeddings(model) as emb:
        image = model.encode_image(pixels)  # [1, dim]
        txt = model.encode_text(input_ids, mask)  # [1, dim]
        score = F.cosine_similarity(image, txt, dim=-1).sum()
        if fmap.value is None:
            raise VlkitError(f"the image tower of a {type(model).__name__} showed no feature map")
        embedded = emb.get("value")  # [1, length, width]
        with_words = embedded is not None and embedded.requires_grad
        grads = torch.autograd.grad(score, [fmap.value, embedded] if with_words else [fmap.value])
    spatial, grad_map = fmap.spatial().detach(), fmap.spatial(grads[0])  # [1, channels, h, w]
    words = word_weights(embedded.detach(), grads[1], input_ids, mask, tokenizer) if with_words else []
    cam = cam_from_map(spatial[0], grad_map[0], per_position=fmap.kind == "vit")  # [h, w]
    heat = F.interpolate(cam[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    top = heat.max()
    heat = heat / top if top > 0 else torch.zeros_like(heat)
    return Explanation(heat.cpu(), float(score.detach()), words,
                       "token-gradcam" if fmap.kind == "vit" else "gradcam")


def mass_inside(heat: Tensor, mask: Tensor) -> float:
    """The share of a heat map's total mass that lies inside a boolean mask of the same size."""
    if heat.shape != mask.shape:
        raise VlkitError(f"heat map {tuple(heat.shape)} and mask {tuple(mask.shape)} differ in size")
    total = float(heat.sum())
    return float(heat[mask].sum()) / total if total > 0 else 0.0
