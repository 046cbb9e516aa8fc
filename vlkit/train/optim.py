"""AdamW with parameter groups (image tower, text tower, heads; no decay on norms, biases, embeddings and
the temperature) and a warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from vlkit.config.schema import OptimConfig

NO_DECAY_WORDS = ("embed", "logit_scale", "logit_bias", "class_embedding", "queries")


def lr_group(model: nn.Module, name: str) -> str:
    """``image``, ``text`` or ``head`` for a parameter name, from the model's ``LR_GROUPS`` prefixes."""
    for group, prefixes in getattr(model, "LR_GROUPS", {}).items():
        if name.startswith(prefixes):
            return group
    return "head"


def uses_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Matrices decay; norms, biases, embeddings, position tables and the temperature do not."""
    return param.ndim >= 2 and not any(word in name for word in NO_DECAY_WORDS)


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Trainable parameters split by (tower, decay), each group with its learning rate."""
    lrs = {"image": cfg.lr_image, "text": cfg.lr_text, "head": cfg.lr_head}
    groups: dict[tuple[str, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        key = (lr_group(model, name), uses_weight_decay(name, param))
        group = groups.setdefault(key, {"params": [], "names": [], "lr": lrs[key[0]], "group": key[0],
                                        "weight_decay": cfg.weight_decay if key[1] else 0.0})
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    groups = param_groups(model, cfg)
    for g in groups:
        g["initial_lr"] = g["lr"]
    return torch.optim.AdamW(groups, lr=cfg.lr_head, betas=tuple(cfg.betas), eps=cfg.eps,
                             fused=cfg.fused or None)


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier: linear warmup over ``warmup`` steps, then cosine decay to ``min_ratio``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    warmup = min(cfg.warmup_steps, max(0, total_steps - 1))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup, total_steps, cfg.min_lr_ratio))
