"""Parameter groups (image tower, text tower, heads; no decay on norms, biases, embeddings and the
temperature), the optimizer ``optim.name`` chooses over them (:mod:`vlkit.train.optimizers`) and the
learning-rate schedule ``optim.schedule`` chooses (:mod:`vlkit.train.schedules`)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from vlkit.config.schema import OptimConfig
from vlkit.train.optimizers import create_optimizer
from vlkit.train.schedules import build_scheduler, lr_factor

__all__ = ["build_optimizer", "build_scheduler", "group_lrs", "lr_factor", "lr_group", "param_groups",
           "uses_weight_decay"]

NO_DECAY_WORDS = ("embed", "logit_scale", "logit_bias", "class_embedding", "queries")
LR_GROUP_NAMES = ("image", "text", "head")


def lr_group(model: nn.Module, name: str) -> str:
    """``image``, ``text`` or ``head`` for a parameter name, from the model's ``LR_GROUPS`` prefixes.

    Args:
        model: the bare model (not a wrapper): ``name`` is relative to it, as its ``LR_GROUPS`` prefixes are.
        name: a parameter name from ``model.named_parameters()``.
    """
    for group, prefixes in getattr(model, "LR_GROUPS", {}).items():
        if name.startswith(prefixes):
            return group
    return "head"


def uses_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Matrices decay; norms, biases, embeddings, position tables and the temperature do not."""
    return param.ndim >= 2 and not any(word in name for word in NO_DECAY_WORDS)


def param_groups(model: nn.Module, cfg: OptimConfig, heads: Iterable[nn.Module] = ()) -> list[dict]:
    """Trainable parameters split by (tower, decay), each group with its learning rate.

    The model's parameters are grouped by its own ``LR_GROUPS`` prefixes (names relative to the model);
    every parameter of ``heads`` (the tasks: their heads, answer classifiers) trains at ``lr_head``. A
    parameter reachable from both (a task that holds the model) is taken once, with the model's group.

    Args:
        model: the bare model (unwrapped from DDP / compile).
        cfg: the optimizer config (``lr_image``, ``lr_text``, ``lr_head``, ``weight_decay``).
        heads: further modules whose parameters are heads, e.g. the trainer's tasks.

    Returns:
        Optimizer parameter groups; each carries ``group`` (``image``/``text``/``head``) and the parameter ``names``
        (``tasks.<i>.`` before a head's parameter name).
    """
    lrs = {"image": cfg.lr_image, "text": cfg.lr_text, "head": cfg.lr_head}
    groups: dict[tuple[str, bool], dict] = {}
    seen: set[int] = set()

    def add(name: str, param: nn.Parameter, tower: str) -> None:
        if not param.requires_grad or id(param) in seen:
            return
        seen.add(id(param))
        key = (tower, uses_weight_decay(name, param))
        group = groups.setdefault(key, {"params": [], "names": [], "lr": lrs[tower], "group": tower,
                                        "weight_decay": cfg.weight_decay if key[1] else 0.0})
        group["params"].append(param)
        group["names"].append(name)

    for name, param in model.named_parameters():
        add(name, param, lr_group(model, name))
    for i, head in enumerate(heads):
        for name, param in head.named_parameters():
            add(f"tasks.{i}.{name}", param, "head")
    return list(groups.values())


def build_optimizer(model: nn.Module, cfg: OptimConfig, heads: Iterable[nn.Module] = ()) -> torch.optim.Optimizer:
    """The optimizer ``cfg.name`` (AdamW by default) over :func:`param_groups` of ``model`` and ``heads``, each
    group at its own learning rate.

    Raises:
        VlkitError: an unknown optimizer, or one that refuses its settings.
    """
    groups = param_groups(model, cfg, heads)
    for g in groups:
        g["initial_lr"] = g["lr"]
    return create_optimizer(groups, cfg)


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The current learning rate of each tower group that has trainable parameters: ``{"image": .., "head": ..}``."""
    out: dict[str, float] = {}
    for g in optimizer.param_groups:
        if g["params"]:
            out.setdefault(g.get("group", "head"), float(g["lr"]))
    return out
