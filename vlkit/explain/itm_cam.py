"""Per-word Grad-CAM of the image-text matching (ITM) score of fusion models (ALBEF, BLIP), the method LAVIS
shows for them.

In a fusion model the text tokens attend to the image tokens through cross-attention, layer after layer, and the
ITM head reads the fused first token ([CLS], BLIP's [ENC]). For one chosen cross-attention layer the attention
probabilities ``A`` ``[heads, words, 1 + patches]`` are multiplied by the gradient of the ITM "match" logit with
respect to them, the negative part of the gradient cut (``A >= 0``, so this equals cutting the product), and
averaged over the heads:

    cam[t, j] = mean_h  A[h, t, j] * max(0, d logit_match / d A[h, t, j])

Row ``t`` laid out on the patch grid (the image's class token left out) is the map of token ``t``; the map of the
whole text is the mean over its tokens (the special tokens and padding left out).

The layer: by default the middle one of the stack, ``min(n // 2, n - 2)`` for ``n`` cross-attention layers
(never the last, at least 0). LAVIS uses the middle layer (BLIP's 12 layers: layer 6; ALBEF's six fusion layers:
the third). The last layer cannot show words at all: after it only the first token is read by the ITM head, so
no other token's attention there has a gradient and every word's map would be empty. ``layer`` overrides it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlkit.errors import VlkitError
from vlkit.explain.gradcam import Explanation
from vlkit.explain.towers import image_tower
from vlkit.explain.words import WordWeight, tap_token_embeddings
from vlkit.modules.layers.attention import MultiHeadAttention, recording_attention

#: what a model needs for an ITM explanation
MATCHING_METHODS = ("image_tokens", "fuse", "itm_head")


@dataclass
class MatchExplanation(Explanation):
    """Where each word of a text finds its match in an image, under a fusion model's ITM head.

    Attributes:
        heat: the whole text's map ``[H, W]`` over the input image (the mean of the words' maps), in [0, 1].
        score: the ITM probability that the image matches the text.
        words: each token with its gradient x input on the match logit.
        method: ``itm-gradcam``.
        word_heats: one map per token ``[tokens, H, W]``, each scaled to [0, 1] by its own maximum.
        word_cams: the maps on the patch grid before upsampling and scaling, ``[tokens, h, w]``.
        tokens: the tokens the maps belong to, as the tokenizer spells them.
        layer: the cross-attention layer read (0-based).
        match_logit: the ITM head's "match" logit, whose gradient weights the attention.
    """

    word_heats: Tensor | None = None
    word_cams: Tensor | None = None
    tokens: list[str] = field(default_factory=list)
    layer: int = 0
    match_logit: float = 0.0


def cross_attention_layers(model: nn.Module) -> list[MultiHeadAttention]:
    """The cross-attention layers of ``model`` in forward order (the momentum copies left out)."""
    return [m for name, m in model.named_modules()
            if isinstance(m, MultiHeadAttention) and m.cross and not name.startswith("momentum_encoders")]


def default_layer(count: int) -> int:
    """The layer read by default among ``count`` cross-attention layers: the middle one, never the last
    (see the module docstring)."""
    return max(0, min(count // 2, count - 2))


def can_explain_matching(model: nn.Module) -> bool:
    """Whether ``model`` has an ITM head over text tokens that cross-attend to image tokens."""
    return all(callable(getattr(model, name, None)) for name in MATCHING_METHODS) and bool(
        cross_attention_layers(model))


def check_layer(model: nn.Module, layer: int | None) -> int:
    """The layer to read: ``layer`` checked against the model's cross-attention layers, or the default.

    Raises:
        VlkitError: the model cannot be explained by its ITM head, or ``layer`` is out of range.
    """
    if not can_explain_matching(model):
        has_itm = callable(getattr(model, "itm_head", None))
        why = ("its ITM head reads no cross-attention from the words to the image" if has_itm
               else "it has no image-text matching (ITM) head")
        raise VlkitError(f"an ITM explanation needs a fusion model with cross-attention (albef-*, blip-*); "
                         f"a {type(model).__name__} does not qualify: {why}")
    count = len(cross_attention_layers(model))
    if layer is None:
        return default_layer(count)
    if not 0 <= layer < count:
        raise VlkitError(f"--layer {layer}: a {type(model).__name__} has {count} cross-attention layers "
                         f"(0 to {count - 1})")
    return layer


def _word_positions(input_ids: Tensor, attention_mask: Tensor, tokenizer) -> tuple[list[int], list[str]]:
    """Positions and spellings of the real tokens of the first text (special tokens and padding left out)."""
    positions, spelled = [], []
    inner = getattr(tokenizer, "tokenizer", None)
    for pos, token_id in enumerate(input_ids[0].tolist()):
        if not attention_mask[0, pos] or not tokenizer.decode([token_id]).strip():
            continue
        positions.append(pos)
        name = inner.id_to_token(token_id) if inner is not None else None
        spelled.append(name or tokenizer.decode([token_id]))
    return positions, spelled


def itm_gradcam(probs: Tensor, gradient: Tensor, grid: tuple[int, int]) -> Tensor:
    """LAVIS's ITM Grad-CAM of one pair from a cross-attention layer's probabilities and their gradient.

    Args:
        probs: ``[heads, text_tokens, 1 + h*w]`` (the image's class token first).
        gradient: the gradient of the match logit with respect to ``probs``, same shape.
        grid: ``(h, w)`` of the patches.

    Returns:
        ``[text_tokens, h, w]``, non-negative.
    """
    cam = (probs[..., 1:] * gradient[..., 1:].clamp(min=0)).mean(dim=0)  # [text_tokens, h*w]
    return cam.reshape(cam.shape[0], *grid)


def _upsample(cams: Tensor, size: tuple[int, int]) -> Tensor:
    """``[n, h, w]`` -> ``[n, H, W]``, bilinear, each map scaled to [0, 1] by its maximum (zeros stay zeros)."""
    heat = F.interpolate(cams[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    top = heat.flatten(1).amax(dim=1)[:, None, None]
    return torch.where(top > 0, heat / torch.where(top > 0, top, torch.ones_like(top)), torch.zeros_like(heat))


def explain_matching(model: nn.Module, tokenizer, pixels: Tensor, text: str,
                     layer: int | None = None) -> MatchExplanation:
    """Per-word ITM Grad-CAM and word weights of one image and one text under a fusion model.

    Args:
        model: a fusion model with ``image_tokens``, ``fuse`` and ``itm_head`` (ALBEF, BLIP), in eval mode.
        tokenizer: its tokenizer.
        pixels: the normalised image ``[3, S, S]`` or ``[1, 3, S, S]``.
        text: the text.
        layer: the cross-attention layer to read (None: :func:`default_layer`).

    Returns:
        A :class:`MatchExplanation` whose maps have the image's size.

    Raises:
        VlkitError: the model has no ITM head over cross-attention, ``layer`` is out of range, or the text has
            no word.
    """
    index = check_layer(model, layer)
    attn = cross_attention_layers(model)[index]
    if pixels.dim() == 3:
        pixels = pixels[None]
    device = next(model.parameters()).device
    pixels = pixels.to(device).float()
    tokens = tokenizer([text.strip()])
    input_ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
    positions, spelled = _word_positions(input_ids, mask, tokenizer)
    if not positions:
        raise VlkitError(f"the text {text!r} has no word the tokenizer knows apart from special tokens")
    size = tuple(pixels.shape[-2:])
    with torch.enable_grad(), recording_attention(attn), tap_token_embeddings(model) as emb:
        image = model.image_tokens(pixels)  # [1, 1 + h*w, vision_width]
        if not image.requires_grad:  # a frozen image tower: its tokens become a leaf, so the keys join the graph
            image = image.detach().requires_grad_(True)
        logits = model.itm_head(model.fuse(image, input_ids, mask)[:, 0])  # [1, 2]: not matched, matched
        match = logits[0, 1]
        probs = attn.attention_probs  # [1, heads, text_tokens, 1 + h*w]
        if probs is None or probs.shape[2] != input_ids.shape[1]:
            raise VlkitError(f"cross-attention layer {index} of a {type(model).__name__} does not attend from the "
                             "words to the image; an ITM explanation needs text tokens as its queries")
        embedded = emb.get("value")  # [1, length, width]
        with_words = embedded is not None and embedded.requires_grad
        grads = torch.autograd.grad(match, [probs, embedded] if with_words else [probs])
    grid = image_tower(model).patch_embed.grid(*size)
    if grid[0] * grid[1] != probs.shape[-1] - 1:
        raise VlkitError(f"{probs.shape[-1]} image tokens do not make a class token and a {grid[0]}x{grid[1]} grid")
    cams = itm_gradcam(probs[0].detach(), grads[0][0], grid)[positions]  # [words, h, w]
    words = []
    if with_words:
        contribution = (grads[1][0] * embedded[0].detach()).sum(-1)  # [length]
        words = [WordWeight(name, float(contribution[pos])) for pos, name in zip(positions, spelled)]
    word_heats = _upsample(cams, size)
    heat = _upsample(cams.mean(dim=0, keepdim=True), size)[0]
    return MatchExplanation(heat.cpu(), float(logits.detach().softmax(-1)[0, 1]), words, "itm-gradcam",
                            word_heats=word_heats.cpu(), word_cams=cams.cpu(), tokens=spelled, layer=index,
                            match_logit=float(match.detach()))
