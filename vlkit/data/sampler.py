"""A distributed, resumable epoch sampler.

Every rank draws the same permutation for an epoch (seeded from the seed and the epoch
number) and takes every ``num_replicas``-th index of it, so ranks see disjoint shares of
equal length. The sampler remembers how far into the epoch this rank is, so a run
restored from a checkpoint mid-epoch continues with exactly the indices it had not
seen yet.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Iterator

import torch
from torch.utils.data import Sampler

from vlkit.errors import VlkitError

_STATE_KEYS = ("epoch", "position", "seed", "num_samples", "num_replicas")


def _default_world() -> tuple[int, int]:
    """(world size, rank) of the initialised process group, else (1, 0)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit generator seed that differs for every (seed, epoch) pair.

    Unlike ``seed + epoch``, (0, 1) and (1, 0) give unrelated seeds. The value depends
    only on the two numbers, so it is the same in every process.
    """
    digest = hashlib.sha256(f"vlkit-sampler:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class DistributedEpochSampler(Sampler[int]):
    """Shuffled (or ordered) indices split evenly across ranks, resumable mid-epoch.

    Args:
        num_samples: dataset size.
        num_replicas: number of ranks; defaults to the ``torch.distributed`` world size
            when a process group is initialised, else 1.
        rank: this rank; defaults to the ``torch.distributed`` rank, else 0.
        shuffle: permute the indices each epoch; False keeps ``0 .. num_samples - 1``.
        seed: base seed, which must be the same on every rank.
        drop_last: drop the tail that does not divide evenly among ranks; otherwise
            pad by wrapping around to the start of the permutation.

    Raises:
        VlkitError: an empty dataset, a rank outside ``0 .. num_replicas - 1``, or
            ``drop_last`` with fewer samples than ranks.
    """

    def __init__(
        self,
        num_samples: int,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        world_size, world_rank = _default_world()
        num_replicas = world_size if num_replicas is None else num_replicas
        rank = world_rank if rank is None else rank
        _check_layout(num_samples, num_replicas, rank, drop_last)
        super().__init__()
        self.num_samples = num_samples
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.position = 0

    # ------------------------------------------------------------------ sizes

    @property
    def samples_per_rank(self) -> int:
        """Indices each rank gets in a whole epoch."""
        if self.drop_last:
            return self.num_samples // self.num_replicas
        return math.ceil(self.num_samples / self.num_replicas)

    @property
    def total_size(self) -> int:
        """Indices all ranks together get in an epoch, padding included."""
        return self.samples_per_rank * self.num_replicas

    def __len__(self) -> int:
        """Indices this rank has left in the current epoch."""
        return self.samples_per_rank - self.position

    # ------------------------------------------------------------------ indices

    def epoch_indices(self) -> list[int]:
        """This rank's whole share of the current epoch, from its start."""
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(epoch_seed(self.seed, self.epoch))
            order = torch.randperm(self.num_samples, generator=generator)  # [num_samples]
        else:
            order = torch.arange(self.num_samples)  # [num_samples]
        repeats = math.ceil(self.total_size / self.num_samples)
        padded = order.repeat(repeats)[: self.total_size]  # [total_size]
        return padded[self.rank :: self.num_replicas].tolist()  # [samples_per_rank]

    def __iter__(self) -> Iterator[int]:
        """Yield this rank's remaining indices, advancing ``position`` as they are taken.

        After the last index the position goes back to 0; the epoch stays as it is
        until :meth:`set_epoch` changes it.
        """
        indices = self.epoch_indices()
        for i in range(self.position, len(indices)):
            self.position = i + 1
            yield indices[i]
        self.position = 0

    # ------------------------------------------------------------------ state

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutation to draw.

        Changing the epoch starts it from the beginning; setting the current epoch again
        (as a training loop does after resuming) keeps the position.
        """
        if epoch != self.epoch:
            self.epoch = epoch
            self.position = 0

    def set_position(self, position: int) -> None:
        """Declare how many of this rank's indices were already consumed this epoch.

        With a prefetching DataLoader the sampler runs ahead of training, so a trainer
        should set this from its own count of samples processed before saving state.

        Raises:
            VlkitError: ``position`` is outside ``0 .. samples_per_rank``.
        """
        if not 0 <= position <= self.samples_per_rank:
            raise VlkitError(
                f"sampler position {position} is outside 0..{self.samples_per_rank} "
                "(this rank's samples per epoch)"
            )
        self.position = position

    def state_dict(self) -> dict[str, Any]:
        """Epoch, position and the layout the position refers to."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "num_replicas": self.num_replicas,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore epoch, position and seed from :meth:`state_dict`.

        Raises:
            VlkitError: keys are missing, or the state was saved for a different dataset
                size or number of ranks (its position would mean other indices).
        """
        missing = [key for key in _STATE_KEYS if key not in state]
        if missing:
            raise VlkitError(f"sampler state lacks {', '.join(missing)}")
        for key in ("num_samples", "num_replicas"):
            if state[key] != getattr(self, key):
                raise VlkitError(
                    f"sampler state was saved with {key}={state[key]}, but this run has "
                    f"{key}={getattr(self, key)}; resume with the same data and number of ranks"
                )
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.set_position(int(state["position"]))

    def __repr__(self) -> str:
        return (
            f"DistributedEpochSampler(num_samples={self.num_samples}, "
            f"num_replicas={self.num_replicas}, rank={self.rank}, epoch={self.epoch}, "
            f"position={self.position})"
        )


def _check_layout(num_samples: int, num_replicas: int, rank: int, drop_last: bool) -> None:
    """Raise VlkitError unless the dataset size, ranks and drop_last make sense together."""
    if num_samples < 1:
        raise VlkitError(f"cannot sample from an empty dataset (num_samples={num_samples})")
    if num_replicas < 1:
        raise VlkitError(f"num_replicas must be at least 1, got {num_replicas}")
    if not 0 <= rank < num_replicas:
        raise VlkitError(
            f"rank {rank} is outside 0..{num_replicas - 1} (num_replicas={num_replicas})"
        )
    if drop_last and num_samples < num_replicas:
        raise VlkitError(
            f"drop_last with {num_samples} samples over {num_replicas} ranks leaves every rank "
            "without samples; use drop_last=False or fewer ranks"
        )
