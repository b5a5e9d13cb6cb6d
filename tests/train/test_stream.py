import itertools

import torch

from mmssl.data.samplers import BucketBatchSampler
from mmssl.train.stream import BatchStream


def _collate(items):
    if all(i is None for i in items):
        return None
    return {"idx": torch.tensor([i for i in items if i is not None])}


class _DrawHook:
    """Stands in for a masking hook: draws from the global generator."""

    def __call__(self, batch):
        batch["draw"] = torch.rand(3)
        return batch


def _stream(workers=0, data=None):
    data = data if data is not None else list(range(40))
    durations = [1.0 + (i % 7) * 0.3 for i in range(len(data))]
    sampler = BucketBatchSampler(durations, max_seconds=6.0, seed=3)
    return BatchStream(data, sampler, _collate, hook=_DrawHook(), num_workers=workers, seed=5)


def _take(stream, n):
    return [(b["idx"].tolist(), b["draw"]) for b in itertools.islice(iter(stream), n)]


def test_resume_mid_epoch_and_across_epochs_gives_the_same_batches_and_draws():
    full = _take(_stream(), 30)  # more than one epoch
    first = _stream()
    head = _take(first, 7)
    state = first.state_dict()
    assert state["offset"] == 7  # batches taken, not batches prefetched
    again = _stream()
    again.load_state_dict(state)
    tail = _take(again, 23)
    for (ia, da), (ib, db) in zip(full, head + tail):
        assert ia == ib and torch.equal(da, db)
    assert full[0][0] != full[-1][0]


def test_worker_count_does_not_change_batches_or_draws():
    plain = _take(_stream(workers=0), 6)
    threaded = _take(_stream(workers=1), 6)
    for (ia, da), (ib, db) in zip(plain, threaded):
        assert ia == ib and torch.equal(da, db)


def test_batches_whose_records_all_failed_are_skipped_but_counted():
    from mmssl.data.collate import collate

    data = [None] * 40  # every record bad but one
    data[0] = {"id": "good", "audio": torch.ones(5)}
    sampler = BucketBatchSampler([1.0] * 40, max_seconds=4.0, shuffle=False)
    stream = BatchStream(data, sampler, collate, hook=_DrawHook())
    batches = list(stream.one_epoch())
    assert [b["ids"] for b in batches] == [["good"]]
    assert stream.offset == 10  # the nine empty batches still moved the position
    assert stream.skipped == 39 and "skipped" not in batches[0]  # every bad record counted
    assert stream.state_dict()["skipped"] == 39
    resumed = BatchStream(data, sampler, collate, hook=_DrawHook())
    resumed.load_state_dict(stream.state_dict())
    assert resumed.skipped == 39


def test_an_epoch_without_any_usable_batch_is_an_error():
    import pytest

    from mmssl.data.collate import collate
    from mmssl.errors import DataError

    stream = BatchStream([None] * 4, BucketBatchSampler([1.0] * 4, max_seconds=2.0), collate)
    with pytest.raises(DataError, match="no usable batch"):
        next(iter(stream))
