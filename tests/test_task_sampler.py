"""The multi-task step sampler: analytic probabilities, empirical frequencies, exact resume, errors."""

from __future__ import annotations

import math

import pytest
import torch

from vlkit.train.task_sampler import TaskSampler, task_probabilities

SIZES = [1000, 300, 100]
DRAWS = 20_000


def _frequencies(sampler: TaskSampler, draws: int = DRAWS) -> list[float]:
    counts = torch.bincount(torch.tensor([sampler.next() for _ in range(draws)]), minlength=sampler.num_tasks)
    return (counts.double() / draws).tolist()


@pytest.mark.parametrize("strategy, kwargs, expected", [
    ("proportional", {}, [1000 / 1400, 300 / 1400, 100 / 1400]),
    ("fixed", {"weights": [1.0, 1.0, 2.0]}, [0.25, 0.25, 0.5]),
    ("temperature", {"temperature": 1.0}, [1000 / 1400, 300 / 1400, 100 / 1400]),
    ("temperature", {"temperature": 2.0},
     [s ** 0.5 / sum(x ** 0.5 for x in SIZES) for s in SIZES]),
    ("temperature", {"temperature": math.inf}, [1 / 3] * 3),
    ("round_robin", {}, [1 / 3] * 3),
])
def test_empirical_frequencies_match_the_probabilities(strategy, kwargs, expected):
    sampler = TaskSampler(SIZES, strategy, seed=3, **kwargs)
    assert sampler.probabilities == pytest.approx(expected, abs=1e-12)
    # 20k Bernoulli draws: standard error <= 0.0036, so 0.015 is over 4 standard errors
    assert _frequencies(sampler) == pytest.approx(expected, abs=0.015)


def test_large_temperature_tends_to_uniform():
    spread = [max(task_probabilities(SIZES, "temperature", temperature=t)) - 1 / 3 for t in (1, 2, 10, 1000)]
    assert spread == sorted(spread, reverse=True) and spread[-1] < 1e-3


def test_zero_weight_task_is_never_drawn():
    sampler = TaskSampler(SIZES, "fixed", weights=[0, 3, 0], seed=1)
    assert sampler.probabilities == [0.0, 1.0, 0.0]
    assert set(sampler.next() for _ in range(2000)) == {1}


def test_round_robin_order():
    sampler = TaskSampler([5, 1, 9], "round_robin")
    assert [sampler.next() for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]


def test_same_seed_same_sequence_and_global_rng_untouched():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = [TaskSampler(SIZES, "proportional", seed=7).next() for _ in range(1)]
    s1, s2 = TaskSampler(SIZES, "proportional", seed=7), TaskSampler(SIZES, "proportional", seed=7)
    first = [s1.next() for _ in range(200)]
    assert first == [s2.next() for _ in range(200)] and first[:1] == a
    assert first != [TaskSampler(SIZES, "proportional", seed=8).next() for _ in range(200)]
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("strategy, kwargs", [
    ("proportional", {}), ("fixed", {"weights": [2, 1, 1]}), ("temperature", {"temperature": 3.0}),
    ("round_robin", {}),
])
def test_resume_continues_the_exact_sequence(strategy, kwargs):
    sampler = TaskSampler(SIZES, strategy, seed=11, **kwargs)
    [sampler.next() for _ in range(50)]
    state = sampler.state_dict()
    expected = [sampler.next() for _ in range(50)]
    resumed = TaskSampler(SIZES, strategy, seed=0, **kwargs)  # another seed: the state decides
    resumed.load_state_dict(state)
    assert [resumed.next() for _ in range(50)] == expected
    assert resumed.steps == 100


def test_state_survives_torch_save(tmp_path):
    sampler = TaskSampler(SIZES, "proportional", seed=5)
    [sampler.next() for _ in range(13)]
    torch.save({"task_sampler": sampler.state_dict()}, tmp_path / "state.pt")
    expected = [sampler.next() for _ in range(20)]
    resumed = TaskSampler(SIZES, "proportional")
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True)["task_sampler"])
    assert [resumed.next() for _ in range(20)] == expected


@pytest.mark.parametrize("args, kwargs, message", [
    ((SIZES, "sometimes"), {}, "unknown strategy 'sometimes'; choose one of round_robin, proportional"),
    ((SIZES, "fixed"), {}, "needs weights"),
    ((SIZES, "fixed"), {"weights": [1, 2]}, "2 weights for 3 tasks"),
    ((SIZES, "fixed"), {"weights": [1, -1, 2]}, "weight 1 is -1"),
    ((SIZES, "fixed"), {"weights": [1, float("nan"), 2]}, "finite and non-negative"),
    ((SIZES, "fixed"), {"weights": [0, 0, 0]}, "all weights are zero"),
    ((SIZES, "temperature"), {"temperature": 0.0}, "temperature must be positive"),
    ((SIZES, "temperature"), {"temperature": -1.0}, "temperature must be positive"),
    (([], "proportional"), {}, "no tasks"),
    (([10, 0], "proportional"), {}, "task 1 has size 0"),
])
def test_bad_arguments_are_clear_value_errors(args, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        TaskSampler(*args, **kwargs)


def test_unused_options_are_ignored_and_mismatched_state_rejected():
    # the trainer passes weights and temperature whatever the strategy
    assert TaskSampler(SIZES, "proportional", weights=[1, 2], temperature=-1.0).num_tasks == 3
    state = TaskSampler(SIZES, "proportional").state_dict()
    with pytest.raises(ValueError, match="strategy 'proportional' over 3 tasks"):
        TaskSampler(SIZES[:2], "proportional").load_state_dict(state)
    with pytest.raises(ValueError, match="missing generator"):
        TaskSampler(SIZES, "proportional").load_state_dict({"strategy": "proportional", "num_tasks": 3, "steps": 0})
