"""A HuBERT run interrupted after a checkpoint and resumed (with another data worker count)
logs the same losses as an uninterrupted run: its masks, dropout and LayerDrop replay."""

import pytest
import torch

from mmssl.data.collate import collate
from mmssl.registry import OBJECTIVES
from mmssl.train.loop import LoopOptions, Trainer
from mmssl.train.optim import Schedule, build_adamw
from mmssl.train.stream import BatchStream
from tests.train.toy import ToyBatchSampler, read_metrics

STEPS = 6


class _Stop(Exception):
    pass


def _stop_after_4(step):
    if step == 4:
        raise _Stop


def _dataset(n=12):
    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(n):
        samples = int(torch.randint(4000, 8000, (1,), generator=g))
        frames = 1 + (samples - 400) // 160  # 100 Hz labels, as MFCC k-means writes them
        items.append(
            {
                "id": f"u{i}",
                "audio": 0.1 * torch.randn(samples, generator=g),
                "targets": torch.randint(5, (frames,), generator=g),
            }
        )
    return items


def _trainer(run_dir, workers, callbacks=()):
    import mmssl.objectives  # noqa: F401  (registers the objectives)

    torch.manual_seed(0)
    objective = OBJECTIVES.build(
        "hubert", size="tiny", num_classes=5, mask_prob=0.5, mask_span=4, encoder={"layer_drop": 0.3}
    )
    data = _dataset()
    stream = BatchStream(
        data, ToyBatchSampler(len(data), 3), collate, hook=objective.batch_hook(), num_workers=workers, seed=0
    )
    opts = LoopOptions(max_steps=STEPS, log_every=1, save_every=2, progress=False)
    schedule = Schedule(peak_lr=1e-3, total_steps=STEPS, kind="linear", warmup_steps=2)
    return Trainer(
        objective,
        build_adamw(objective, lr=1e-3),
        schedule,
        stream,
        opts,
        run_dir,
        device=torch.device("cpu"),
        callbacks=callbacks,
    )


def test_resumed_hubert_run_logs_the_same_losses(tmp_path):
    _trainer(tmp_path / "ref", workers=0).fit()
    expected = [(r["step"], r["loss"], r["masked_accuracy"]) for r in read_metrics(tmp_path / "ref")]
    assert len({loss for _, loss, _ in expected}) == STEPS

    with pytest.raises(_Stop):
        _trainer(tmp_path / "run", workers=1, callbacks=[_stop_after_4]).fit()
    resumed = _trainer(tmp_path / "run", workers=2)
    assert resumed.resume() and resumed.step == 4
    resumed.fit()
    got = [(r["step"], r["loss"], r["masked_accuracy"]) for r in read_metrics(tmp_path / "run")]
    assert got == expected
