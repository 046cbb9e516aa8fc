"""Which task a multi-task training step goes to: round robin, or a seeded draw from a task distribution.

Strategies, for tasks whose training sets hold ``sizes[i]`` samples:

* ``round_robin``: tasks in turn, ``0, 1, ..., n - 1, 0, 1, ...`` (no randomness);
* ``proportional``: task ``i`` with probability ``sizes[i] / sum(sizes)``;
* ``fixed``: task ``i`` with probability ``weights[i] / sum(weights)``;
* ``temperature``: task ``i`` with probability proportional to ``sizes[i] ** (1 / temperature)``; a temperature
  of 1 is ``proportional``, larger ones flatten the distribution towards uniform (``inf`` is uniform).

Draws come from the sampler's own ``torch.Generator`` (the global RNG is never touched), one uniform number
per step mapped through the cumulative probabilities, so the sequence depends only on the seed and the
probabilities. :meth:`TaskSampler.state_dict` holds the generator state and the step count: a sampler loaded
from it continues with exactly the draws the saved one would have made.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from typing import Any

import torch

STRATEGIES = ("round_robin", "proportional", "fixed", "temperature")


def _check_sizes(sizes: Sequence[int]) -> list[int]:
    if len(sizes) == 0:
        raise ValueError("task sampler: no tasks (sizes is empty)")
    for i, size in enumerate(sizes):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"task sampler: task {i} has size {size!r}; sizes must be positive integers")
    return list(sizes)


def _check_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        raise ValueError(f"task sampler: strategy 'fixed' needs weights, one per task ({n})")
    if len(weights) != n:
        raise ValueError(f"task sampler: {len(weights)} weights for {n} tasks; give one weight per task")
    out = []
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"task sampler: weight {i} is {w!r}; weights must be finite and non-negative")
        out.append(float(w))
    if sum(out) <= 0:
        raise ValueError("task sampler: all weights are zero; at least one task needs a positive weight")
    return out


def task_probabilities(sizes: Sequence[int], strategy: str, weights: Sequence[float] | None = None,
                       temperature: float = 1.0) -> list[float]:
    """The probability of each task under ``strategy`` (round robin: each task's share of the steps).

    Args: as :class:`TaskSampler`.

    Returns:
        One probability per task, summing to 1.

    Raises:
        ValueError: an unknown strategy or a bad size, weight or temperature.
    """
    sizes = _check_sizes(sizes)
    if strategy == "round_robin":
        raw = [1.0] * len(sizes)
    elif strategy == "proportional":
        raw = [float(s) for s in sizes]
    elif strategy == "fixed":
        raw = _check_weights(weights, len(sizes))
    elif strategy == "temperature":
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"task sampler: temperature must be positive, got {temperature!r}")
        # relative to the largest size, so that large datasets and small temperatures do not overflow
        largest = max(sizes)
        raw = [(s / largest) ** (1.0 / temperature) for s in sizes]
    else:
        raise ValueError(f"task sampler: unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    total = sum(raw)
    return [r / total for r in raw]


class TaskSampler:
    """Chooses the task of each training step; deterministic given the seed, and resumable.

    Args:
        sizes: training set size of each task (positive).
        strategy: ``round_robin``, ``proportional``, ``fixed`` or ``temperature`` (see the module docstring).
        weights: one non-negative weight per task, for ``fixed`` (not all zero); ignored by the others.
        temperature: the temperature of ``temperature`` (positive, ``inf`` allowed); ignored by the others.
        seed: seed of the sampler's own generator.

    Raises:
        ValueError: an unknown strategy, empty or non-positive sizes, missing, negative or wrongly many
            weights for ``fixed``, or a non-positive temperature for ``temperature``.

    Example:
        >>> sampler = TaskSampler([100, 10], "proportional", seed=0)
        >>> [round(p, 3) for p in sampler.probabilities]
        [0.909, 0.091]
        >>> task = sampler.next()  # 0 or 1
    """

    def __init__(self, sizes: Sequence[int], strategy: str, weights: Sequence[float] | None = None,
                 temperature: float = 1.0, seed: int = 0):
        self.sizes = _check_sizes(sizes)
        self.strategy = strategy
        self.seed = int(seed)
        self._probabilities = task_probabilities(self.sizes, strategy, weights, temperature)
        self._cumulative = _cumulative(self._probabilities)
        self._generator = torch.Generator().manual_seed(self.seed)
        self.steps = 0  # draws made so far

    @property
    def num_tasks(self) -> int:
        """Number of tasks."""
        return len(self.sizes)

    @property
    def probabilities(self) -> list[float]:
        """Probability of each task at a step (round robin: each task's share of the steps)."""
        return list(self._probabilities)

    def next(self) -> int:
        """The task of the next training step."""
        if self.strategy == "round_robin":
            task = self.steps % self.num_tasks
        else:
            u = float(torch.rand((), generator=self._generator, dtype=torch.float64))
            # first task whose cumulative probability exceeds u; a zero-probability task is never chosen
            task = min(bisect.bisect_right(self._cumulative, u), self.num_tasks - 1)
        self.steps += 1
        return task

    def __iter__(self):
        return self

    def __next__(self) -> int:
        return self.next()

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue the same sequence of tasks."""
        return {"strategy": self.strategy, "num_tasks": self.num_tasks, "seed": self.seed, "steps": self.steps,
                "generator": self._generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict` of a sampler with the same strategy and number of tasks.

        Raises:
            ValueError: the state is of another strategy or another number of tasks, or is incomplete.
        """
        missing = [k for k in ("strategy", "num_tasks", "steps", "generator") if k not in state]
        if missing:
            raise ValueError(f"task sampler state: missing {', '.join(missing)}")
        if state["strategy"] != self.strategy or state["num_tasks"] != self.num_tasks:
            raise ValueError(f"task sampler state is of strategy {state['strategy']!r} over {state['num_tasks']} "
                             f"tasks; this sampler is {self.strategy!r} over {self.num_tasks} tasks")
        self._generator.set_state(state["generator"].clone())
        self.seed = int(state.get("seed", self.seed))
        self.steps = int(state["steps"])


def _cumulative(probabilities: list[float]) -> list[float]:
    """Running sums of ``probabilities``, exactly 1 from the last task with a positive probability on."""
    out, total = [], 0.0
    for p in probabilities:
        total += p
        out.append(total)
    last = max(i for i, p in enumerate(probabilities) if p > 0)
    return out[:last] + [1.0] * (len(out) - last)
