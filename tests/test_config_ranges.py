"""The ranges of the numeric config keys, the checks of the sampling settings and the suggestions for unknown
keys: every problem of a config reported at once, one line per key path."""

from __future__ import annotations

import pytest

from vlkit.config.load import ConfigError, load_config
from vlkit.config.schema import TrainConfig

from .test_config import GOOD, good, problems_of, write  # noqa: F401  (good: a fixture)


# nonsense values, all reported together, one line per key path
NONSENSE = {
    "optim.grad_clip": "-1", "tasks.0.weight": "-1", "optim.weight_decay": "-3", "optim.min_lr_ratio": "5",
    "optim.warmup_steps": "-5", "keep_last": "-1", "optim.lr_image": "-1e-4", "optim.lr_text": "0",
    "optim.lr_head": "-2", "optim.eps": "0", "seed": "-1", "datasets.data.num_workers": "-1", "epochs": "0",
    "max_steps": "0", "log_every": "0", "eval_every": "-2", "save_every": "0", "ema": "1.5",
    "peak_flops": "0", "model.lock.unlocked_blocks": "-1", "optim.betas": "[0.9, 1.0]",
}


def test_every_out_of_range_value_is_reported_at_once(good):
    with pytest.raises(ConfigError) as excinfo:
        load_config(good, [f"{key}={value}" for key, value in NONSENSE.items()])
    found = problems_of(excinfo)
    expected = {("optim.betas.1" if key == "optim.betas" else key) for key in NONSENSE}
    assert set(found) == expected
    assert len(excinfo.value.problems) == len(expected)  # one line each
    assert found["optim.betas.1"] == "must be between 0 and 1 (0 <= betas < 1), got 1.0"
    assert found["optim.grad_clip"] == "must be positive or null, got -1.0"
    assert found["optim.weight_decay"] == "must be non-negative, got -3.0"
    assert found["optim.min_lr_ratio"].startswith("must be between 0 and 1")
    assert "model.lock" in found["optim.lr_text"]  # a rate of 0 is refused, with the way to freeze a tower


@pytest.mark.parametrize("key, value", [("optim.lr_head", ".nan"), ("optim.grad_clip", ".inf"),
                                        ("tasks.0.weight", ".nan"), ("sampling.temperature", "0")])
def test_non_finite_and_zero_values_are_refused(good, key, value):
    with pytest.raises(ConfigError) as excinfo:
        load_config(good, [f"{key}={value}"])
    assert list(problems_of(excinfo)) == [key]


def test_edges_of_the_ranges_are_accepted(good):
    cfg = load_config(good, ["optim.min_lr_ratio=1", "optim.min_lr_ratio=0", "optim.warmup_steps=0",
                             "optim.weight_decay=0", "optim.betas=[0, 0.999]", "seed=4294967295",
                             "optim.grad_clip=null", "keep_last=1", "ema=0.5", "model.lock.unlocked_blocks=0"])
    assert cfg.optim.betas == (0.0, 0.999) and cfg.seed == 2**32 - 1 and cfg.optim.grad_clip is None


def test_every_numeric_key_of_the_schema_declares_a_range():
    import dataclasses
    import typing

    from vlkit.config.schema import Range
    from vlkit.config.typeinfo import is_dataclass_type, strip_optional

    def numeric(tp) -> bool:
        tp, _ = strip_optional(tp)
        if tp in (int, float):
            return True
        return typing.get_origin(tp) in (list, tuple) and all(a in (int, float) for a in typing.get_args(tp))

    unranged, seen = [], set()

    def walk(cls, prefix):
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            inner, _ = strip_optional(tp)
            args = typing.get_args(inner)
            nested = [a for a in (inner, *args) if is_dataclass_type(a)]
            for sub in nested:
                if sub not in seen:
                    seen.add(sub)
                    walk(sub, f"{prefix}{f.name}.")
            if numeric(tp):
                rng = f.metadata.get("range")
                if not isinstance(rng, Range):
                    unranged.append(prefix + f.name)
                else:  # the default itself lies in the range
                    default = f.default if f.default is not dataclasses.MISSING else None
                    for v in (default if isinstance(default, (list, tuple)) else [default]):
                        assert v is None or rng.contains(v), (prefix + f.name, v)

    walk(TrainConfig, "")
    assert unranged == []


def test_sampling_weights_are_checked_with_the_config(good):
    two = ["tasks.1.name=retrieval", "tasks.1.dataset=data"]
    with pytest.raises(ConfigError) as excinfo:
        load_config(good, [*two, "sampling.strategy=fixed", "sampling.weights=[0, 0]"])
    assert problems_of(excinfo)["sampling.weights"].startswith("all weights are zero")
    with pytest.raises(ConfigError) as excinfo:
        load_config(good, [*two, "sampling.strategy=fixed", "sampling.weights=[1, -1]"])
    assert problems_of(excinfo)["sampling.weights.1"].startswith("must be non-negative")
    with pytest.raises(ConfigError) as excinfo:
        load_config(good, [*two, "sampling.strategy=fixed", "sampling.weights=[1]"])
    assert "1 weights for 2 tasks" in problems_of(excinfo)["sampling.weights"]
    # a setting the chosen strategy does not read is an error, not silently ignored
    with pytest.raises(ConfigError) as excinfo:
        load_config(good, [*two, "sampling.strategy=round_robin", "sampling.weights=[1, 2]",
                           "sampling.temperature=5"])
    found = problems_of(excinfo)
    assert "only strategy 'fixed'" in found["sampling.weights"]
    assert "only strategy 'temperature'" in found["sampling.temperature"]
    cfg = load_config(good, [*two, "sampling.strategy=fixed", "sampling.weights=[0, 2]"])
    assert cfg.sampling.weights == [0.0, 2.0]
    # a weight of the wrong type is one problem, not a crash of the weight checks
    with pytest.raises(ConfigError) as excinfo:
        load_config(good, [*two, "sampling.strategy=fixed", "sampling.weights=[1.0, z]"])
    assert problems_of(excinfo) == {"sampling.weights.1": "expected a float, got 'z'"}


def test_an_integer_too_large_for_a_float_is_out_of_range(good):
    with pytest.raises(ConfigError) as excinfo:
        load_config(good, ["seed=" + "9" * 400, "epochs=" + "9" * 400])
    found = problems_of(excinfo)
    assert found["seed"].startswith("must be between 0 and 4294967295")
    assert set(found) == {"seed", "epochs"}


@pytest.mark.parametrize("key, names", [
    ("optim.lr", "'lr_head', 'lr_image' or 'lr_text'"),
    ("optim.lr_hed", "'lr_head'"),
])
def test_unknown_key_suggests_the_keys_it_begins(good, tmp_path, key, names):
    with pytest.raises(ConfigError) as excinfo:  # as an override
        load_config(good, [f"{key}=1e-3"])
    assert problems_of(excinfo)[key].startswith(f"unknown key (did you mean {names}?)")
    section, leaf = key.split(".")
    with pytest.raises(ConfigError) as excinfo:  # in the file
        load_config(write(tmp_path, GOOD + f"{section}:\n  {leaf}: 1.0e-3\n", "lr.yaml"))
    assert problems_of(excinfo)[key] == f"unknown key (did you mean {names}?)"


def test_load_keeps_its_public_names():
    from vlkit.config import load

    for name in load.__all__:
        assert hasattr(load, name), name
    assert load.ConfigError is ConfigError and load.MISSING == "???"
