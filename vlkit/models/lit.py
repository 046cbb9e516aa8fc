"""LiT (Zhai et al. 2022, "locked-image tuning"): train one tower against a locked other tower."""

from __future__ import annotations

from torch import nn

from vlkit.errors import VlkitError


def lock_tower(model: nn.Module, tower: str = "image", unlocked_blocks: int = 0,
               unlock_projection: bool = False) -> nn.Module:
    """Freeze one tower of a two-tower model, optionally leaving its last ``unlocked_blocks`` blocks trainable.

    Locked parts also stay in eval mode when the model is put in training mode, so their batch-norm
    statistics and dropout do not change.

    Args:
        model: a model with ``towers()`` and ``tower_blocks(tower)`` (CLIP, BriVL).
        tower: ``image`` or ``text``.
        unlocked_blocks: last transformer blocks of the tower to keep training.
        unlock_projection: keep the tower's projection into the shared space trainable.

    Returns:
        The model (changed in place).
    """
    towers = model.towers()
    if tower not in towers:
        raise VlkitError(f"tower must be one of {sorted(towers)}, got {tower!r}")
    part = towers[tower]
    part.requires_grad_(False)
    blocks = model.tower_blocks(tower)
    if unlocked_blocks > len(blocks):
        raise VlkitError(f"cannot unlock {unlocked_blocks} blocks: the {tower} tower has {len(blocks)}")
    if unlocked_blocks > 0:
        for block in blocks[-unlocked_blocks:]:
            block.requires_grad_(True)
    if unlock_projection:
        projection = getattr(model, "visual_projection" if tower == "image" else "text_projection", None)
        if projection is None:
            raise VlkitError(f"{type(model).__name__} has no separate {tower} projection to unlock")
        projection.requires_grad_(True)
    frozen = [m for m in part.modules() if not any(p.requires_grad for p in m.parameters(recurse=False))
              and not any(p.requires_grad for p in m.parameters())]
    base_train = model.train

    def train(mode: bool = True) -> nn.Module:
        base_train(mode)
        for module in frozen:
            module.eval()
        return model

    model.train = train  # type: ignore[method-assign]
    model.train(model.training)
    return model
