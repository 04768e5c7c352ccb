"""A seeded, shardable, resumable sampler: the data position survives a kill exactly."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ResumableRandomSampler(Sampler[int]):
    """Per-epoch seeded permutations, sharded over ranks, that can start mid-epoch.

    Yields *global sample ids* ``epoch * n + index``: datasets take ``id % n`` as the index and seed
    their per-sample randomness (crop, flip) from the id, so a sample is the same whatever the
    number of workers and whether the run was resumed.
    """

    def __init__(self, num_samples: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if num_samples < 1:
            raise ValueError("ResumableRandomSampler needs at least one sample")
        self.n = num_samples
        self.seed = seed
        self.rank = rank
        self.world = world_size
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip_next(self, count: int) -> None:
        """Drop the first ``count`` samples of this rank's next iteration (resume mid-epoch)."""
        self._skip = count

    def per_rank(self) -> int:
        return math.ceil(self.n / self.world)

    def __len__(self) -> int:
        """The full epoch length, also while resuming: Lightning counts the restored batches itself."""
        return self.per_rank()

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        total = self.per_rank() * self.world
        perm += perm[: total - self.n]  # pad so every rank takes the same number of steps
        mine = perm[self.rank : total : self.world][self._skip :]
        self._skip = 0
        base = self.epoch * self.n
        return iter([base + i for i in mine])


def sample_generator(seed: int, sample_id: int) -> torch.Generator:
    """A generator for one sample's randomness, independent of workers, ranks and resumption."""
    return torch.Generator().manual_seed((seed * 1_000_003 + sample_id) % (2**63))


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...`` of ``range(n)``: a partition over ranks without padding, so
    per-image scores gathered from all ranks are exactly those of a single-process pass."""

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.rank, self.world = num_samples, rank, world_size

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world))
