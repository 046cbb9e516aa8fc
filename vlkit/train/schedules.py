"""Named learning-rate schedules that ``optim.schedule`` chooses, each after a linear warmup.

A schedule is a multiplier of every group's peak rate. During the first ``warmup_steps`` steps it rises
linearly, ``(step + 1) / warmup``; afterwards the registered decay gives it from ``s``, the steps since the
warmup ended, and ``n``, the steps the decay lasts (``total - warmup``). With ``p = min(1, s / n)`` and
``m = min_lr_ratio``:

    cosine        m + (1 - m) * (1 + cos(pi * p)) / 2
    linear        m + (1 - m) * (1 - p)
    polynomial    m + (1 - m) * (1 - p) ** power
    constant      1
    step          gamma ** (s // step_every)
    inverse_sqrt  sqrt(T / (T + s)), T = timescale, or warmup_steps when it is null

A plug-in registers its decay: ``decay(s: int, n: int, cfg: OptimConfig) -> float``.

Example:
    >>> @register_schedule("halving")
    ... def halving(s, n, cfg):
    ...     return 0.5 ** (2 * s / max(1, n))
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from vlkit.config.schema import OptimConfig
from vlkit.errors import VlkitError

Decay = Callable[[int, int, OptimConfig], float]

_SCHEDULES: dict[str, Decay] = {}


def register_schedule(name: str) -> Callable[[Decay], Decay]:
    """Decorator registering a decay under ``name`` (then ``optim.schedule: NAME`` chooses it).

    Raises:
        ValueError: the name is already registered.
    """
    from vlkit.config.load import register_name

    def wrap(decay: Decay) -> Decay:
        if name in _SCHEDULES:
            raise ValueError(f"schedule {name!r} is already registered")
        _SCHEDULES[name] = decay
        register_name("optim.schedule", name)
        return decay

    return wrap


def schedule_names() -> list[str]:
    """The registered schedule names, sorted."""
    return sorted(_SCHEDULES)


def _progress(s: int, n: int) -> float:
    return min(1.0, s / max(1, n))


@register_schedule("cosine")
def cosine(s: int, n: int, cfg: OptimConfig) -> float:
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * _progress(s, n)))


@register_schedule("linear")
def linear(s: int, n: int, cfg: OptimConfig) -> float:
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * (1.0 - _progress(s, n))


@register_schedule("polynomial")
def polynomial(s: int, n: int, cfg: OptimConfig) -> float:
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * (1.0 - _progress(s, n)) ** cfg.power


@register_schedule("constant")
def constant(s: int, n: int, cfg: OptimConfig) -> float:
    return 1.0


@register_schedule("step")
def step(s: int, n: int, cfg: OptimConfig) -> float:
    if cfg.step_every is None:
        raise VlkitError("optim.step_every: schedule 'step' needs it, e.g. 1000")
    return cfg.gamma ** (s // cfg.step_every)


@register_schedule("inverse_sqrt")
def inverse_sqrt(s: int, n: int, cfg: OptimConfig) -> float:
    timescale = cfg.timescale or cfg.warmup_steps
    if timescale < 1:
        raise VlkitError("optim.timescale: schedule 'inverse_sqrt' needs it (or warmup_steps > 0)")
    return math.sqrt(timescale / (timescale + s))


def lr_factor(step_index: int, cfg: OptimConfig, total: int) -> float:
    """The multiplier of the peak rates at optimizer step ``step_index`` (0-based) of ``total``.

    The warmup lasts ``min(warmup_steps, total - 1)`` steps, so even a run shorter than its warmup reaches
    its peak rate on its last step.
    """
    warmup = min(cfg.warmup_steps, max(0, total - 1))
    if warmup > 0 and step_index < warmup:
        return (step_index + 1) / warmup
    if cfg.schedule not in _SCHEDULES:
        raise VlkitError(f"optim.schedule: unknown schedule {cfg.schedule!r}; registered: "
                         f"{', '.join(schedule_names())}")
    return float(_SCHEDULES[cfg.schedule](step_index - warmup, max(0, total - warmup), cfg))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Every group's rate, from its own ``initial_lr``, times :func:`lr_factor` (its position, ``last_epoch``,
    is saved and restored with the checkpoint; the multiplier is a plain function, so the checkpoint holds
    no config object).

    Raises:
        VlkitError: an unknown schedule, or one whose setting is missing.
    """

    def factor(step_index: int) -> float:
        return lr_factor(step_index, cfg, total_steps)

    factor(total_steps - 1)  # an unknown name or a missing setting fails now, not mid-run
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
