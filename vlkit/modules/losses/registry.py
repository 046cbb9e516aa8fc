"""Named losses that a task's ``loss:`` key chooses.

A loss is registered for one task. The retrieval task's own losses (``contrastive``, ``siglip``,
``momentum``) and the captioning task's (``caption``, ``coca``) are listed here by name and computed by the
task itself; a plug-in loss for the retrieval task is a function of the whole batch's embeddings:

    loss_fn(image_embeds, text_embeds, scale) -> Tensor  (a scalar, or an object with a ``.loss`` scalar)

with ``image_embeds`` and ``text_embeds`` ``[batch, dim]`` (unit length, gathered from every rank, with
gradients) and ``scale`` the model's similarity multiplier (``exp(logit_scale)``). With ``grad_accum`` the
function sees the whole optimizer step's batch at once, as the built-in contrastive loss does.

Example:
    >>> import torch.nn.functional as F
    >>> @register_loss("my_loss", task="retrieval")
    ... def my_loss(image_embeds, text_embeds, scale):
    ...     logits = scale * image_embeds @ text_embeds.T
    ...     return F.cross_entropy(logits, torch.arange(len(logits), device=logits.device))

This module imports nothing heavy: the config validation reads the names from it.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Callable, Optional


@dataclass(frozen=True)
class LossSpec:
    """One registered loss.

    Args:
        name: the value of a task's ``loss:`` key.
        task: the task that reads it (``retrieval``, ``captioning`` or a plug-in task).
        fn: the loss function, or None for a loss the task computes itself (the built-in ones).
        needs: a model attribute the loss uses (``queue`` for ``momentum``), checked once the model is built.
        models: shell patterns of the built-in model names that have ``needs``; another built-in model is a
            config error (plug-in models are checked once built).
        hint: how a model gets ``needs``, said in the error.
    """

    name: str
    task: str
    fn: Optional[Callable[..., Any]] = None
    needs: Optional[str] = None
    models: tuple[str, ...] = ("*",)
    hint: str = ""


_LOSSES: dict[tuple[str, str], LossSpec] = {}

#: the model families vlkit ships (a ``models`` pattern decides only for these names)
BUILTIN_FAMILIES = ("clip-", "coca-", "albef-", "blip-", "blip2-", "vilt-", "vlmo-", "captioner-", "brivl-")


def _add(spec: LossSpec) -> None:
    key = (spec.task, spec.name)
    if key in _LOSSES:
        raise ValueError(f"loss {spec.name!r} of task {spec.task!r} is already registered")
    _LOSSES[key] = spec


def register_loss(name: str, task: str = "retrieval") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering a loss function that ``tasks: [{name: TASK, loss: NAME}]`` chooses.

    Args:
        name: the loss's name (unique per task).
        task: the task that reads it; the retrieval task calls it as ``fn(image_embeds, text_embeds, scale)``.

    Raises:
        ValueError: the name is already registered for that task.
    """

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        _add(LossSpec(name, task, fn))
        return fn

    return wrap


def loss_names(task: Optional[str] = None) -> set[str]:
    """The registered loss names, of one task or of every task."""
    return {name for (t, name) in _LOSSES if task is None or t == task}


def get_loss(task: str, name: str) -> LossSpec:
    """The loss ``name`` of ``task``.

    Raises:
        KeyError: no such loss for that task.
    """
    return _LOSSES[(task, name)]


def model_problem(spec: LossSpec, model_name: str) -> Optional[str]:
    """Why a built-in model ``model_name`` cannot train with ``spec`` (None when it may): the loss needs a
    model attribute that the model's family does not have (``"it has no queue (...)"``). A plug-in model is
    checked once built (:func:`check_model`)."""
    if spec.needs is None or not model_name.startswith(BUILTIN_FAMILIES):
        return None
    if any(fnmatch.fnmatch(model_name, pattern) for pattern in spec.models):
        return None
    return _lacks(spec)


def _lacks(spec: LossSpec) -> str:
    return f"it has no {spec.needs}" + (f" ({spec.hint})" if spec.hint else "")


def check_model(spec: LossSpec, model: Any, model_name: str) -> Optional[str]:
    """Why the built model cannot train with ``spec`` (None when it can): it lacks the attribute the loss uses
    (a brivl model without ``momentum``, a plug-in model)."""
    if spec.needs is None or getattr(model, spec.needs, None) is not None:
        return None
    return f"model {model_name!r} cannot train with loss {spec.name!r}: {_lacks(spec)}"


for _name in ("contrastive", "siglip"):
    _add(LossSpec(_name, "retrieval"))
_add(LossSpec("momentum", "retrieval", needs="queue", models=("brivl-*",),
              hint="the loss needs momentum encoders and feature queues: a brivl-* model with "
                   "model.args.momentum > 0, e.g. 0.995"))
for _name in ("caption", "coca"):
    _add(LossSpec(_name, "captioning"))
