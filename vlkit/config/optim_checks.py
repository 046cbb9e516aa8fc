"""Cross-field checks of the ``optim`` and ``early_stop`` sections: a setting that the chosen built-in optimizer
or schedule would ignore, a setting it needs, and an early-stopping metric of no task's dataset.

A setting counts as given when it differs from its default (a saved ``config.yaml`` holds every key). A
plug-in optimizer or schedule may read any key, so nothing is flagged for it.
"""

from __future__ import annotations

from vlkit.config.schema import OptimConfig, TrainConfig
from vlkit.config.typeinfo import field_default, fields

#: the optim keys each built-in optimizer reads besides the rates, weight_decay and grad_clip
OPTIMIZER_KEYS = {"adamw": ("betas", "eps", "fused"), "sgd": ("momentum", "nesterov", "fused"),
                  "adafactor": ("beta2_decay",), "lamb": ("betas", "eps")}
#: the optim keys each built-in schedule reads besides warmup_steps
SCHEDULE_KEYS = {"cosine": ("min_lr_ratio",), "linear": ("min_lr_ratio",), "polynomial": ("min_lr_ratio", "power"),
                 "constant": (), "step": ("step_every", "gamma"), "inverse_sqrt": ("timescale",)}


def _readers(table: dict[str, tuple[str, ...]], key: str) -> str:
    names = sorted(name for name, keys in table.items() if key in keys)
    return " and ".join(names)


def _unread(optim: OptimConfig, table: dict[str, tuple[str, ...]], chosen: str, what: str,
            problems: list[str]) -> None:
    if chosen not in table:  # a plug-in: it may read anything
        return
    defaults = fields(OptimConfig)
    keys = sorted({k for keys in table.values() for k in keys} - set(table[chosen]))
    for key in keys:
        value = getattr(optim, key)
        default = field_default(defaults[key])
        if isinstance(default, tuple):
            value = tuple(value) if isinstance(value, (list, tuple)) else value
        if value != default:
            setting = "optim.name" if what == "optimizer" else "optim.schedule"
            problems.append(f"optim.{key}: {what} {chosen!r} does not read it (read by {what} "
                            f"{_readers(table, key)}); remove it or set {setting} to one that reads it")


def optim_checks(optim: OptimConfig, problems: list[str]) -> None:
    """Settings the chosen optimizer or schedule ignores or needs (every field of ``optim`` is already valid)."""
    try:
        _unread(optim, OPTIMIZER_KEYS, optim.name, "optimizer", problems)
        _unread(optim, SCHEDULE_KEYS, optim.schedule, "schedule", problems)
    except TypeError:  # a field that failed its own check: already reported
        return
    if optim.name == "sgd" and optim.nesterov and not optim.momentum > 0:
        problems.append("optim.nesterov: Nesterov momentum needs optim.momentum > 0")
    if optim.schedule == "step" and optim.step_every is None:
        problems.append("optim.step_every: schedule 'step' needs it (steps between two decays), e.g. 1000")
    if optim.schedule == "inverse_sqrt" and optim.timescale is None and optim.warmup_steps == 0:
        problems.append("optim.timescale: schedule 'inverse_sqrt' with no warmup needs it (the decay is "
                        "sqrt(timescale / (timescale + steps after warmup))), e.g. 1000")


def early_stop_checks(cfg: TrainConfig, problems: list[str]) -> None:
    """The early-stopping metric must be a validation metric of a task's dataset: ``val/<dataset>/<name>``."""
    metric = cfg.early_stop.metric
    if not isinstance(metric, str):
        return
    keys = sorted({t.dataset for t in cfg.tasks if isinstance(getattr(t, "dataset", None), str)})
    parts = metric.split("/")
    if len(parts) < 3 or parts[0] != "val" or parts[1] not in keys:
        examples = ", ".join(f"val/{k}/..." for k in keys) or "val/<dataset>/<metric>"
        problems.append(f"early_stop.metric: {metric!r} is not a validation metric of a task's dataset "
                        f"(expected {examples}, e.g. val/{keys[0] if keys else 'data'}/rsum)")
        return
    data = cfg.datasets.get(parts[1]) if isinstance(cfg.datasets, dict) else None
    if data is not None and getattr(data, "val_split", "") is None:
        problems.append(f"early_stop.metric: dataset {parts[1]} has no validation split (datasets.{parts[1]}."
                        f"val_split is null), so {metric!r} is never measured")
