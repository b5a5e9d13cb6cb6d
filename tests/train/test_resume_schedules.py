"""Every registered objective, interrupted after a checkpoint and resumed in a new trainer,
continues as the uninterrupted run: the same logged losses and metrics at every step (Gumbel
temperature, EMA decay...) and, as each step starts, the same scheduled state (every plain
public attribute of every module, e.g. ``quantizer.temperature``, ``ema_decay``).

Objectives with a schedule get settings under which it moves within these few steps (``FAST``),
so a resume that restarts it from its initial value shows.
"""

from __future__ import annotations

import pytest
import torch

import mmssl.objectives  # noqa: F401  (registers the objectives)
from mmssl.data.collate import collate
from mmssl.registry import OBJECTIVES
from mmssl.testing import synthetic_items
from mmssl.train.loop import LoopOptions, Trainer
from mmssl.train.optim import Schedule, build_adamw
from mmssl.train.stream import BatchStream
from tests.train.toy import ToyBatchSampler, read_metrics

STEPS, STOP = 4, 2
SECONDS = (0.96, 0.72, 0.48, 0.6, 0.84, 0.52)  # two batches of three
# wall-clock rates differ from run to run
TIMING = ("audio_sec_per_sec", "steps_per_sec")
FAST = {
    "wav2vec2": dict(temp_decay=0.8),  # Gumbel temperature 2, 1.6, 1.28, 1.02
    "decoar2": dict(temp_decay=0.8),
    "data2vec": dict(ema_start=0.5, ema_end=0.9, ema_anneal_steps=STEPS),
    "ctc": dict(freeze_steps=STOP + 1),  # the encoder is still frozen at the first step after the resume
}
PLAIN = (int, float, bool, str)


class _Stop(Exception):
    pass


def _stop_at_checkpoint(step: int) -> None:
    if step == STOP:
        raise _Stop


def _scheduled_state(objective: torch.nn.Module) -> dict:
    """``{module name: {attribute: value}}`` of the plain public attributes of every module."""
    return {
        name: {
            k: v for k, v in sorted(vars(module).items()) if not k.startswith("_") and isinstance(v, PLAIN)
        }
        for name, module in objective.named_modules()
    }


def _trainer(name: str, run_dir, callbacks=()) -> tuple[Trainer, list[dict]]:
    torch.manual_seed(0)
    objective = OBJECTIVES.build(name, size="tiny", **FAST.get(name, {}))
    items = synthetic_items(objective, SECONDS)
    stream = BatchStream(items, ToyBatchSampler(len(items), 3), collate, hook=objective.batch_hook(), seed=0)
    opts = LoopOptions(max_steps=STEPS, log_every=1, save_every=STOP, progress=False)
    schedule = Schedule(peak_lr=1e-3, total_steps=STEPS, kind="linear", warmup_steps=1)
    trainer = Trainer(
        objective,
        build_adamw(objective, lr=1e-3),
        schedule,
        stream,
        opts,
        run_dir,
        device=torch.device("cpu"),
        callbacks=callbacks,
    )
    states: list[dict] = []
    objective.register_forward_pre_hook(lambda module, args: states.append(_scheduled_state(module)))
    return trainer, states


def _metrics(run_dir) -> list[dict]:
    return [{k: v for k, v in record.items() if k not in TIMING} for record in read_metrics(run_dir)]


@pytest.mark.parametrize("name", OBJECTIVES.names())
def test_resumed_run_continues_every_schedule(name, tmp_path):
    reference, reference_states = _trainer(name, tmp_path / "ref")
    reference.fit()
    expected = _metrics(tmp_path / "ref")
    assert [r["step"] for r in expected] == list(range(1, STEPS + 1))

    first, _ = _trainer(name, tmp_path / "run", callbacks=[_stop_at_checkpoint])
    with pytest.raises(_Stop):
        first.fit()
    resumed, resumed_states = _trainer(name, tmp_path / "run")
    assert resumed.resume() and resumed.step == STOP
    resumed.fit()

    assert len(resumed_states) == STEPS - STOP
    for step, (got, want) in enumerate(zip(resumed_states, reference_states[STOP:]), STOP + 1):
        diff = {
            f"{module}.{key}": (got.get(module, {}).get(key), value)
            for module, attrs in want.items()
            for key, value in attrs.items()
            if got.get(module, {}).get(key) != value
        }
        assert not diff, (
            f"step {step} of the resumed run starts with (this, not the uninterrupted run's): {diff}"
        )
    assert _metrics(tmp_path / "run") == expected
