"""Named optimizers that ``optim.name`` chooses: AdamW (the default), SGD with momentum / Nesterov, Adafactor
and LAMB, and any a plug-in registers.

An optimizer is built from the parameter groups of :func:`vlkit.train.optim.param_groups` (each with its own
``lr`` and ``weight_decay``, and the extra keys ``group``, ``names`` and ``initial_lr``) and the optim config:

    build(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer

Example:
    >>> @register_optimizer("rmsprop")
    ... def rmsprop(groups, cfg):
    ...     return torch.optim.RMSprop(groups, lr=cfg.lr_head, momentum=cfg.momentum)

LAMB (You et al. 2020) comes from the ``pytorch-optimizer`` package (``pip install vlkit[optim]``), run as
the paper's algorithm: the weight decay is part of the update whose norm the trust ratio divides, the
moments are not bias-corrected (the paper's third version), so a step moves a tensor by ``lr * min(||w||, 10)``.
"""

from __future__ import annotations

from typing import Callable

import torch

from vlkit.config.schema import OptimConfig
from vlkit.errors import VlkitError

OptimizerBuilder = Callable[[list[dict], OptimConfig], torch.optim.Optimizer]

_OPTIMIZERS: dict[str, OptimizerBuilder] = {}


def register_optimizer(name: str) -> Callable[[OptimizerBuilder], OptimizerBuilder]:
    """Decorator registering an optimizer builder under ``name`` (then ``optim.name: NAME`` chooses it).

    Raises:
        ValueError: the name is already registered.
    """
    from vlkit.config.load import register_name

    def wrap(build: OptimizerBuilder) -> OptimizerBuilder:
        if name in _OPTIMIZERS:
            raise ValueError(f"optimizer {name!r} is already registered")
        _OPTIMIZERS[name] = build
        register_name("optim.name", name)
        return build

    return wrap


def optimizer_names() -> list[str]:
    """The registered optimizer names, sorted."""
    return sorted(_OPTIMIZERS)


def create_optimizer(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer ``cfg.name`` over ``groups``.

    Raises:
        VlkitError: an unknown name, or the optimizer refused a setting (naming ``optim.name``).
    """
    if cfg.name not in _OPTIMIZERS:
        raise VlkitError(f"optim.name: unknown optimizer {cfg.name!r}; registered: {', '.join(optimizer_names())}")
    try:
        return _OPTIMIZERS[cfg.name](groups, cfg)
    except (ValueError, TypeError) as exc:
        raise VlkitError(f"optim.name: optimizer {cfg.name!r} refused its settings: {exc}") from None


@register_optimizer("adamw")
def adamw(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW with ``betas``, ``eps`` and (on GPU) ``fused``."""
    return torch.optim.AdamW(groups, lr=cfg.lr_head, betas=tuple(cfg.betas), eps=cfg.eps, fused=cfg.fused or None)


@register_optimizer("sgd")
def sgd(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD with ``momentum`` and ``nesterov``; the weight decay is added to the gradient (L2)."""
    return torch.optim.SGD(groups, lr=cfg.lr_head, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           fused=cfg.fused or None)


@register_optimizer("adafactor")
def adafactor(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    """PyTorch's Adafactor (factored second moments, no first moment) with ``beta2_decay``. A group's rate
    is Adafactor's relative step, capped at ``1 / sqrt(step)`` and scaled by the parameter's RMS (at least
    1e-3); the weight decay multiplies the weights by ``1 - lr * weight_decay``."""
    return torch.optim.Adafactor(groups, lr=cfg.lr_head, beta2_decay=cfg.beta2_decay)


@register_optimizer("lamb")
def lamb(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    """LAMB from ``pytorch-optimizer``: Adam's direction scaled per tensor by the trust ratio
    ``min(||w||, 10) / ||update||``, the weight decay inside the update."""
    try:
        from pytorch_optimizer import Lamb
    except ImportError:
        raise VlkitError("optim.name=lamb needs the pytorch-optimizer package: pip install 'vlkit[optim]' "
                         "(or pip install pytorch-optimizer)") from None
    # weight_decouple=False: the decay joins the update the trust ratio measures; adam_debias=True: the step is
    # the group's rate (the package otherwise divides it by 1 - beta1 ** t, which the paper does not)
    return Lamb(groups, lr=cfg.lr_head, betas=tuple(cfg.betas), eps=cfg.eps, weight_decouple=False, adam_debias=True)
