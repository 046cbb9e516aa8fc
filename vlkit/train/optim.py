"""AdamW with parameter groups (image tower, text tower, heads; no decay on norms, biases, embeddings and
the temperature) and a warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from vlkit.config.schema import OptimConfig

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
        AdamW parameter groups; each carries ``group`` (``image``/``text``/``head``) and the parameter ``names``
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


def build_optimizer(model: nn.Module, cfg: OptimConfig, heads: Iterable[nn.Module] = ()) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` of ``model`` and ``heads``, each group at its own learning rate."""
    groups = param_groups(model, cfg, heads)
    for g in groups:
        g["initial_lr"] = g["lr"]
    return torch.optim.AdamW(groups, lr=cfg.lr_head, betas=tuple(cfg.betas), eps=cfg.eps,
                             fused=cfg.fused or None)


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The current learning rate of each tower group that has trainable parameters: ``{"image": .., "head": ..}``."""
    out: dict[str, float] = {}
    for g in optimizer.param_groups:
        if g["params"]:
            out.setdefault(g.get("group", "head"), float(g["lr"]))
    return out


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier: linear warmup over ``warmup`` steps, then cosine decay to ``min_ratio``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    """Warmup then cosine decay of every group's rate, each from its own ``initial_lr``."""
    warmup = min(cfg.warmup_steps, max(0, total_steps - 1))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup, total_steps, cfg.min_lr_ratio))
