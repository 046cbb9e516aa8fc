"""Where an image tower keeps its last feature map, found by forward hooks rather than by names.

A CNN tower (EfficientNet in BriVL) gives a map ``[batch, channels, h, w]``: what its ``forward_features``
returns (the last map of a list of stage maps), else the last 4-d output of any of its modules in forward order. A ViT tower (CLIP) gives tokens ``[batch, 1 + h*w, width]``:
its map is the input of its last block (the last block of a class-token ViT computes the class token only).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

from torch import Tensor, nn

from vlkit.errors import VlkitError


@dataclass
class FeatureMap:
    """The last feature map of an image tower during one forward pass.

    Attributes:
        kind: ``"cnn"`` (``value`` is ``[batch, channels, h, w]``) or ``"vit"`` (``[batch, 1 + h*w, width]``).
        value: the activation, kept in the autograd graph.
        grid: ``(h, w)`` of the map.
    """

    kind: str
    value: Tensor | None = None
    grid: tuple[int, int] = (0, 0)

    def spatial(self, value: Tensor | None = None) -> Tensor:
        """The map (or a tensor of its shape, such as its gradient) as ``[batch, channels, h, w]``: a ViT's
        patch tokens laid out on their grid."""
        value = self.value if value is None else value
        if value is None:
            raise VlkitError("the image tower produced no feature map")
        if self.kind == "cnn":
            return value
        tokens = value[:, -self.grid[0] * self.grid[1]:]  # [batch, h*w, width]
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *self.grid)


def image_tower(model: nn.Module) -> nn.Module:
    """The image tower of a two-tower model (the module of its ``LR_GROUPS["image"]`` prefix).

    Raises:
        VlkitError: the model names no image tower.
    """
    prefixes = getattr(model, "LR_GROUPS", {}).get("image") or ()
    for prefix in prefixes:
        with contextlib.suppress(AttributeError):
            return model.get_submodule(prefix.rstrip("."))
    raise VlkitError(f"a {type(model).__name__} names no image tower (LR_GROUPS['image'])")


#: Config keys by which a model runs a frozen pretrained tower without autograd (BriVL): 0 means frozen.
FROZEN_TOWER_KEYS = ("trainable_backbone_blocks", "trainable_text_layers")


@contextlib.contextmanager
def gradients_through(model: nn.Module) -> Iterator[None]:
    """Let gradients flow through towers the model runs without autograd because they are frozen (BriVL's
    ``trainable_backbone_blocks=0``): the keys are raised to 1 for the block, so the activations are recorded
    (the weights themselves keep ``requires_grad=False`` and receive nothing)."""
    config = getattr(model, "config", None)
    lifted = [key for key in FROZEN_TOWER_KEYS if getattr(config, key, None) == 0]
    for key in lifted:
        setattr(config, key, 1)
    try:
        yield
    finally:
        for key in lifted:
            setattr(config, key, 0)


def _is_vit(tower: nn.Module) -> bool:
    return hasattr(tower, "patch_embed") and hasattr(tower, "blocks") and hasattr(tower, "class_embedding")


@contextlib.contextmanager
def tap_feature_map(model: nn.Module, image_size: tuple[int, int]) -> Iterator[FeatureMap]:
    """Record the last feature map of ``model``'s image tower while the block runs.

    Args:
        model: a two-tower model.
        image_size: ``(H, W)`` of the images it will see (a ViT's token grid depends on it).

    Yields:
        A :class:`FeatureMap` filled by the forward pass.
    """
    tower = image_tower(model)
    handles = []
    if _is_vit(tower):
        found = FeatureMap("vit", grid=tuple(tower.patch_embed.grid(*image_size)))
        blocks = tower.blocks
        source = blocks[-2] if len(blocks) > 1 else tower.ln_pre

        def keep(module, args, output):
            found.value = output

        handles.append(source.register_forward_hook(keep))
    else:
        found = FeatureMap("cnn")

        def keep_last_map(module, args, output):
            if isinstance(output, Tensor) and output.dim() == 4 and output.requires_grad:
                found.value = output
                found.grid = (output.shape[2], output.shape[3])

        handles += [m.register_forward_hook(keep_last_map) for m in tower.modules()]
        original = getattr(tower, "forward_features", None)
        if callable(original):  # its return value is the map itself (after any functional activation)

            def forward_features(*args, **kwargs):
                out = original(*args, **kwargs)
                last = out[-1] if isinstance(out, (list, tuple)) else out  # a backbone's stage maps: the last
                if isinstance(last, Tensor) and last.dim() == 4 and last.requires_grad:
                    found.value, found.grid = last, (last.shape[2], last.shape[3])
                return out

            tower.forward_features = forward_features  # an instance attribute, removed below
    try:
        yield found
    finally:
        for h in handles:
            h.remove()
        if "forward_features" in vars(tower):
            del tower.forward_features
