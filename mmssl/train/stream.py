"""An endless, resumable stream of training batches over epochs.

The data workers collate each batch and run the objective's batch hook (masks, mixing) with the
global torch generator seeded from (seed, rank, epoch, batch position) alone, so a hook that
draws from that generator (directly, or through a generator seeded from it per call,
``mmssl.nn.masking.hook_generator``) makes the same masks in a resumed run as in an
uninterrupted one, whatever the worker count. The stream's position is counted in
batches the loop has *taken* (not what the workers prefetched), and that is what a checkpoint
stores: ``{"epoch", "offset"}``, the batch sampler's own state format.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, Dataset

from mmssl.errors import DataError

Collate = Callable[[list], Any]


class ResumableBatchSampler(Protocol):
    """What the stream needs from a batch sampler (``mmssl.data.samplers.BucketBatchSampler``)."""

    def __iter__(self) -> Iterator[list[int]]: ...
    def set_epoch(self, epoch: int) -> None: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def batch_seed(seed: int, rank: int, epoch: int, position: int) -> int:
    """A 63-bit seed for one batch, distinct across ranks, epochs and positions."""
    mixed = hash((int(seed), int(rank), int(epoch), int(position)))  # tuples of ints hash stably
    return mixed & ((1 << 63) - 1)


class _KeyedItems(Dataset):
    """``dataset[(index, seed)]`` -> ``(dataset[index], seed)``: carries the batch seed to collate."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> tuple[Any, int]:
        index, seed = key
        return self.dataset[index], seed


class _SeededBatches:
    def __init__(self, sampler: ResumableBatchSampler, seed: int, rank: int, epoch: int, start: int) -> None:
        self.sampler, self.seed, self.rank, self.epoch, self.start = sampler, seed, rank, epoch, start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for k, indices in enumerate(self.sampler, start=self.start):
            s = batch_seed(self.seed, self.rank, self.epoch, k)
            yield [(int(i), s) for i in indices]


class SeededCollate:
    """Picklable collate for the workers: collate the items, then run the batch hook, both under
    the batch's seed (the caller's generator state is restored afterwards). The batch's
    ``skipped`` is how many of its records the dataset skipped as bad (``None`` items)."""

    def __init__(self, collate: Collate, hook: Callable[[dict], dict] | None = None) -> None:
        self.collate, self.hook = collate, hook

    def __call__(self, keyed: list[tuple[Any, int]]) -> Any:
        seed = keyed[0][1]
        items = [item for item, _ in keyed]
        skipped = sum(item is None for item in items)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            batch = self.collate(items)
            if _is_empty(batch):
                return {"ids": [], "skipped": skipped}
            if self.hook is not None:
                batch = self.hook(batch)
        batch["skipped"] = skipped
        return batch


def _is_empty(batch: Any) -> bool:
    """No usable record: ``None``, or a batch with an empty ``ids`` list (``mmssl.data.collate``)."""
    return batch is None or (isinstance(batch, dict) and "ids" in batch and len(batch["ids"]) == 0)


class BatchStream:
    """Batches forever: epoch after epoch of ``batch_sampler`` over ``dataset``.

    ``collate(items) -> batch``; a batch with no usable record (``None`` or empty ``ids``, when
    every record of it was bad) is skipped, its position still counted. ``skipped`` counts the
    bad records met so far (kept in the state, so a resumed run goes on counting).
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_sampler: ResumableBatchSampler,
        collate: Collate,
        *,
        hook: Callable[[dict], dict] | None = None,
        num_workers: int = 0,
        seed: int = 0,
        rank: int = 0,
        pin_memory: bool = False,
    ) -> None:
        self.dataset, self.batch_sampler = dataset, batch_sampler
        self.collate_fn = SeededCollate(collate, hook)
        self.num_workers, self.seed, self.rank, self.pin_memory = num_workers, seed, rank, pin_memory
        self.epoch, self.offset, self.skipped = 0, 0, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self.skipped = int(state.get("skipped", 0))

    def _loader(self) -> DataLoader:
        self.batch_sampler.set_epoch(self.epoch)
        self.batch_sampler.load_state_dict({"epoch": self.epoch, "offset": self.offset})
        batches = _SeededBatches(self.batch_sampler, self.seed, self.rank, self.epoch, self.offset)
        return DataLoader(
            _KeyedItems(self.dataset),
            batch_sampler=batches,  # type: ignore[arg-type]
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            # its own generator: starting workers must not consume the global generator, or a
            # resumed run would continue with different dropout than an uninterrupted one
            generator=torch.Generator().manual_seed(batch_seed(self.seed, self.rank, self.epoch, -1)),
        )

    def one_epoch(self) -> Iterator[dict]:
        """The rest of the current epoch from the current position (evaluation uses this)."""
        for batch in self._loader():
            self.offset += 1
            if isinstance(batch, dict):
                self.skipped += int(batch.pop("skipped", 0))
            if not _is_empty(batch):
                yield batch

    def __iter__(self) -> Iterator[dict]:
        while True:
            start, produced = self.offset, 0
            for batch in self.one_epoch():
                produced += 1
                yield batch
            if start == 0 and produced == 0:
                raise DataError(
                    f"epoch {self.epoch} gave no usable batch (an empty manifest, every clip "
                    "over the batch duration limit, or every record bad?)"
                )
            self.epoch, self.offset = self.epoch + 1, 0


def to_device(batch: dict, device: torch.device) -> dict:
    """Tensors to ``device`` (asynchronously from pinned memory); lists and strings stay."""
    non_blocking = device.type == "cuda"
    return {k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v for k, v in batch.items()}
