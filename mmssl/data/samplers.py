"""Batches of records of similar duration under a padded-seconds budget, sharded across ranks.

Batches are formed from the durations alone (no decoding), so the same (seed, epoch) gives
the same batches on every rank and after a restart.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from mmssl.errors import ConfigError

# Durations are jittered by up to this fraction before sorting, so batch composition changes
# from epoch to epoch while batches stay homogeneous (as fairseq's size-sorted batching with
# shuffled ties, with a little more mixing).
JITTER = 0.05


def pack_batches(order: Sequence[int], durations: Sequence[float], max_seconds: float) -> list[list[int]]:
    """Greedily cut ``order`` into consecutive batches whose padded size
    ``max(duration) * count`` stays under ``max_seconds``. A record longer than
    ``max_seconds`` on its own becomes a batch of one."""
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0.0
    for index in order:
        d = float(durations[index])
        if current and max(longest, d) * (len(current) + 1) > max_seconds:
            batches.append(current)
            current, longest = [], 0.0
        current.append(index)
        longest = max(longest, d)
    if current:
        batches.append(current)
    return batches


def _even_out(batches: list[list[int]], world_size: int) -> list[list[int]]:
    """Split the largest batches in two until every rank can get the same number of batches
    (splitting keeps each half under the budget and every record used exactly once); when
    no batch can be split further, repeat batches from the start."""
    batches = list(batches)
    while len(batches) % world_size:
        largest = max(range(len(batches)), key=lambda i: len(batches[i]))
        if len(batches[largest]) < 2:
            batches += batches[: world_size - len(batches) % world_size]
            break
        big = batches.pop(largest)
        half = len(big) // 2
        batches[largest:largest] = [big[:half], big[half:]]
    return batches


class BucketBatchSampler(Sampler[list[int]]):
    """Yields lists of record indices (use as a DataLoader's ``batch_sampler``).

    Each epoch: sort records by (jittered) duration, pack them into batches with padded size
    under ``max_seconds``, shuffle the batch order (``shuffle``), then give rank ``r`` the
    batches ``r, r + world_size, ...``. All ranks get the same number of batches: the batch
    list is first evened out by splitting large batches (``drop_last=False``) or trimmed
    (``drop_last=True``). Deterministic per (``seed``, epoch).

    Resuming: ``state_dict(consumed)`` records the epoch and how many batches of it were
    used; after ``load_state_dict`` the next iteration continues with batch ``offset`` of the
    same epoch order, and ``__len__`` is the number of batches that iteration yields. With a
    DataLoader the sampler runs ahead of training (prefetching), so pass ``consumed``, the
    number of batches the training loop really finished in this epoch.
    """

    def __init__(
        self,
        durations: Sequence[float],
        max_seconds: float,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> None:
        if max_seconds <= 0:
            raise ConfigError(f"max_seconds must be positive, got {max_seconds}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is not in [0, world_size={world_size})")
        self.durations = [float(d) for d in durations]
        self.max_seconds = float(max_seconds)
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.epoch = 0
        self.offset = 0  # batches of this epoch already used
        self._cache: tuple[int, list[list[int]]] | None = None

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)

    def _all_batches(self) -> list[list[int]]:
        """This epoch's batches for every rank, in order (rank r takes r, r + world_size, ...)."""
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1]
        n = len(self.durations)
        keys = torch.tensor(self.durations, dtype=torch.float64)
        if self.shuffle:
            g = self._generator()
            keys = keys * (1 + JITTER * (2 * torch.rand(n, generator=g, dtype=torch.float64) - 1))
            perm = torch.randperm(n, generator=g)
            order = perm[torch.sort(keys[perm], stable=True).indices].tolist()
        else:
            order = torch.sort(keys, stable=True).indices.tolist()
        batches = pack_batches(order, self.durations, self.max_seconds)
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        if self.drop_last:
            batches = batches[: len(batches) - len(batches) % self.world_size]
        elif batches:
            batches = _even_out(batches, self.world_size)
        self._cache = (self.epoch, batches)
        return batches

    def _rank_batches(self) -> list[list[int]]:
        return self._all_batches()[self.rank :: self.world_size]

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch``; a resumed epoch (set by ``load_state_dict``) keeps its offset."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.offset = 0

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._rank_batches()
        start = self.offset
        for position in range(start, len(batches)):
            self.offset = position + 1
            yield batches[position]
        self.offset = 0

    def __len__(self) -> int:
        return len(self._rank_batches()) - self.offset

    def batches_per_epoch(self) -> int:
        return len(self._rank_batches())

    def state_dict(self, consumed: int | None = None) -> dict:
        """``{"epoch", "offset"}``; ``consumed``: batches of this epoch the caller finished."""
        return {"epoch": self.epoch, "offset": self.offset if consumed is None else int(consumed)}

    def load_state_dict(self, state: dict) -> None:
        offset = int(state["offset"])
        if offset < 0:
            raise ConfigError(f"sampler offset must be >= 0, got {offset}")
        self.epoch = int(state["epoch"])
        self.offset = offset
