"""A run of several objectives on one encoder (objective ``multi``), stopped after a checkpoint
and resumed (with another data worker count), logs the same total and per-part losses as an
uninterrupted run and ends with the same weights: its checkpoint holds the shared encoder once
and gives it back to every part."""

import pytest
import torch

from mmssl.data.collate import collate
from mmssl.registry import OBJECTIVES
from mmssl.runs import latest_checkpoint, load_weights
from mmssl.testing import synthetic_items
from mmssl.train.loop import LoopOptions, Trainer
from mmssl.train.optim import Schedule, build_adamw
from mmssl.train.stream import BatchStream
from tests.train.toy import ToyBatchSampler, read_metrics

STEPS = 6
PARTS = {
    "av_hubert": {"num_classes": 6, "final_dim": 16},
    "multiview": {"name": "multiview_contrastive", "weight": 0.5, "dim": 16},
    "dcca": {"weight": 0.1, "out_dim": 4},
}
LOGGED = ("loss", "av_hubert/loss", "multiview/loss", "dcca/loss")


class _Stop(Exception):
    pass


def _stop_after_4(step):
    if step == 4:
        raise _Stop


def _trainer(run_dir, workers, callbacks=()):
    torch.manual_seed(0)
    objective = OBJECTIVES.build("multi", size="tiny", parts=PARTS)
    data = synthetic_items(objective, seconds=(0.4, 0.32, 0.48, 0.36, 0.28, 0.44, 0.4, 0.32, 0.36), seed=3)
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


def test_a_stopped_multi_run_resumes_to_the_same_losses_and_weights(tmp_path):
    _trainer(tmp_path / "ref", workers=0).fit()
    expected = [tuple(r[k] for k in ("step", *LOGGED)) for r in read_metrics(tmp_path / "ref")]
    assert len({row[1] for row in expected}) == STEPS

    with pytest.raises(_Stop):
        _trainer(tmp_path / "run", workers=1, callbacks=[_stop_after_4]).fit()
    resumed = _trainer(tmp_path / "run", workers=0)
    assert resumed.resume() and resumed.step == 4
    # the checkpoint's encoder reached every part: they all hold the one module
    enc = resumed.objective.encoder
    assert resumed.objective.parts["dcca"].views.video_tower is enc
    resumed.fit()
    got = [tuple(r[k] for k in ("step", *LOGGED)) for r in read_metrics(tmp_path / "run")]
    assert got == expected
    ref, run = (load_weights(latest_checkpoint(tmp_path / d)) for d in ("ref", "run"))
    assert ref.keys() == run.keys() and all(torch.equal(ref[k], run[k]) for k in ref)
