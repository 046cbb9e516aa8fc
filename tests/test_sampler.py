"""DistributedEpochSampler: even shares, coverage, per-epoch order, resumption."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.utils.data import DataLoader

from vlkit.data.sampler import DistributedEpochSampler
from vlkit.errors import VlkitError

LAYOUTS = list(itertools.product((10, 11, 1), (1, 2, 3)))


def shares(num_samples: int, replicas: int, epoch: int = 0, **kwargs) -> list[list[int]]:
    """Every rank's indices for one epoch."""
    out = []
    for rank in range(replicas):
        sampler = DistributedEpochSampler(num_samples, replicas, rank, **kwargs)
        sampler.set_epoch(epoch)
        out.append(list(sampler))
    return out


@pytest.mark.parametrize("num_samples,replicas", LAYOUTS)
@pytest.mark.parametrize("shuffle", [True, False])
def test_equal_lengths_and_coverage(num_samples: int, replicas: int, shuffle: bool) -> None:
    per_rank = shares(num_samples, replicas, shuffle=shuffle)
    expected_len = math.ceil(num_samples / replicas)
    for rank, indices in enumerate(per_rank):
        assert len(indices) == expected_len
        assert len(DistributedEpochSampler(num_samples, replicas, rank)) == expected_len
        assert all(0 <= i < num_samples for i in indices)
    union = [i for indices in per_rank for i in indices]
    assert set(union) == set(range(num_samples))
    if num_samples % replicas == 0:
        assert sorted(union) == list(range(num_samples))  # each index exactly once


def test_unshuffled_order_is_strided() -> None:
    assert shares(10, 3, shuffle=False) == [[0, 3, 6, 9], [1, 4, 7, 0], [2, 5, 8, 1]]


@pytest.mark.parametrize("num_samples,replicas", [(10, 1), (10, 2), (11, 3)])
def test_order_per_epoch_and_seed(num_samples: int, replicas: int) -> None:
    epoch0 = shares(num_samples, replicas, epoch=0, seed=5)
    assert epoch0 == shares(num_samples, replicas, epoch=0, seed=5)
    assert epoch0 != shares(num_samples, replicas, epoch=1, seed=5)
    assert epoch0 != shares(num_samples, replicas, epoch=0, seed=6)
    # seed + epoch is not what seeds the permutation: (5, 1) differs from (6, 0).
    later = shares(num_samples, replicas, epoch=1, seed=5)
    assert later != shares(num_samples, replicas, epoch=0, seed=6)


def test_permutation_shared_by_ranks() -> None:
    # Ranks interleave one permutation: zipping the shares back gives a permutation.
    per_rank = shares(12, 3, epoch=4, seed=1)
    merged = [i for group in zip(*per_rank) for i in group]
    assert sorted(merged) == list(range(12))


@pytest.mark.parametrize("num_samples,replicas", [(10, 1), (10, 2), (10, 3), (11, 2), (11, 3)])
def test_drop_last(num_samples: int, replicas: int) -> None:
    per_rank = shares(num_samples, replicas, drop_last=True)
    union = [i for indices in per_rank for i in indices]
    assert all(len(indices) == num_samples // replicas for indices in per_rank)
    assert len(set(union)) == len(union) == (num_samples // replicas) * replicas


def test_epoch_end_resets_position_only() -> None:
    sampler = DistributedEpochSampler(7, 2, 1, seed=3)
    sampler.set_epoch(2)
    first = list(sampler)
    assert sampler.position == 0 and sampler.epoch == 2 and len(sampler) == 4
    assert list(sampler) == first


@pytest.mark.parametrize("num_samples,replicas", LAYOUTS)
def test_resume_mid_epoch(num_samples: int, replicas: int) -> None:
    for rank in range(replicas):
        sampler = DistributedEpochSampler(num_samples, replicas, rank, seed=9)
        sampler.set_epoch(3)
        uninterrupted = list(sampler)
        for consumed in range(len(uninterrupted) + 1):
            sampler.set_epoch(3)
            taken = list(itertools.islice(iter(sampler), consumed))
            state = sampler.state_dict()
            assert state["position"] == consumed and state["epoch"] == 3

            resumed = DistributedEpochSampler(num_samples, replicas, rank, seed=0)
            resumed.load_state_dict(state)
            resumed.set_epoch(3)  # what a training loop does at the top of the epoch
            assert len(resumed) == len(uninterrupted) - consumed
            assert taken + list(resumed) == uninterrupted
            assert resumed.position == 0
            sampler.set_position(0)


def test_set_position() -> None:
    sampler = DistributedEpochSampler(10, 2, 0)
    full = list(sampler)
    sampler.set_position(3)
    assert len(sampler) == 2
    assert list(sampler) == full[3:]
    with pytest.raises(VlkitError, match="position"):
        sampler.set_position(6)
    with pytest.raises(VlkitError, match="position"):
        sampler.set_position(-1)


def test_set_epoch_to_a_new_epoch_restarts() -> None:
    sampler = DistributedEpochSampler(10)
    sampler.set_position(4)
    sampler.set_epoch(0)
    assert sampler.position == 4
    sampler.set_epoch(1)
    assert sampler.position == 0 and len(sampler) == 10


def test_state_mismatch_raises() -> None:
    state = DistributedEpochSampler(10, 2, 0).state_dict()
    with pytest.raises(VlkitError, match="num_samples"):
        DistributedEpochSampler(11, 2, 0).load_state_dict(state)
    with pytest.raises(VlkitError, match="num_replicas"):
        DistributedEpochSampler(10, 3, 0).load_state_dict(state)
    with pytest.raises(VlkitError, match="position"):
        partial = {k: v for k, v in state.items() if k != "position"}
        DistributedEpochSampler(10, 2, 0).load_state_dict(partial)


def test_invalid_layouts_raise() -> None:
    with pytest.raises(VlkitError, match="empty"):
        DistributedEpochSampler(0)
    with pytest.raises(VlkitError, match="rank"):
        DistributedEpochSampler(10, 2, 2)
    with pytest.raises(VlkitError, match="rank"):
        DistributedEpochSampler(10, 2, -1)
    with pytest.raises(VlkitError, match="num_replicas"):
        DistributedEpochSampler(10, 0, 0)
    with pytest.raises(VlkitError, match="drop_last"):
        DistributedEpochSampler(1, 2, 0, drop_last=True)


def test_defaults_without_process_group() -> None:
    sampler = DistributedEpochSampler(5)
    assert sampler.num_replicas == 1 and sampler.rank == 0
    assert sorted(sampler) == list(range(5))


def test_defaults_from_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 4)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 3)
    sampler = DistributedEpochSampler(10)
    assert (sampler.num_replicas, sampler.rank) == (4, 3)
    assert DistributedEpochSampler(10, 2, 1).num_replicas == 2  # explicit values win


def test_dataloader_resumes_mid_epoch() -> None:
    data = list(range(100, 111))
    sampler = DistributedEpochSampler(len(data), 2, 1, seed=2)
    full = [int(x) for batch in DataLoader(data, batch_size=2, sampler=sampler) for x in batch]
    sampler.set_position(3)
    loader = DataLoader(data, batch_size=2, sampler=sampler)
    assert len(loader) == 2
    assert [int(x) for batch in loader for x in batch] == full[3:]
