import math

import pytest
import torch

from mmssl.train.loop import NonFiniteLossError
from tests.train.toy import make_trainer, params, read_metrics


def _trainable(trainer):
    return {n: p.detach().clone() for n, p in trainer.objective.named_parameters() if p.requires_grad}


def test_logged_values_are_window_means_and_schedule(tmp_path):
    every = make_trainer(tmp_path / "a", max_steps=6, log_every=1)
    every.fit()
    windowed = make_trainer(tmp_path / "b", max_steps=6, log_every=3)
    windowed.fit()
    per_step = read_metrics(tmp_path / "a")
    logged = read_metrics(tmp_path / "b")
    assert [r["step"] for r in per_step] == list(range(1, 7))
    assert [r["step"] for r in logged] == [3, 6]
    for rec, lo in zip(logged, (0, 3)):
        for key in ("loss", "mse_loss", "grad_norm", "ema_gap"):
            expected = sum(r[key] for r in per_step[lo : lo + 3]) / 3
            assert rec[key] == pytest.approx(expected, rel=1e-5), key
    # linear warm-up over 2 steps to 3e-2, then linear decay to 0 at step 6
    assert [r["lr"] for r in per_step] == pytest.approx([1.5e-2, 3e-2, 3e-2, 2.25e-2, 1.5e-2, 7.5e-3])
    assert every.objective.steps_set == [0, 1, 2, 3, 4, 5]  # before each step: updates done
    assert every.objective.steps_seen == [1, 2, 3, 4, 5, 6]  # after each step
    assert (tmp_path / "a" / "tb").is_dir() and (tmp_path / "a" / "checkpoints" / "latest").is_file()


def test_accumulation_equals_the_combined_batch(tmp_path):
    # two micro-batches of 2 (mean loss each, halved) == one batch of the same 4 utterances
    big = make_trainer(tmp_path / "a", max_steps=3, batch_size=4, dropout=0.0, noise=0.0)
    small = make_trainer(tmp_path / "b", max_steps=3, batch_size=2, accum_steps=2, dropout=0.0, noise=0.0)
    big.fit()
    small.fit()
    a, b = params(big.objective), params(small.objective)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
    la, lb = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["loss"] for r in la] == pytest.approx([r["loss"] for r in lb], rel=1e-5)
    assert la[-1]["loss"] != la[0]["loss"]


def test_nonfinite_loss_skips_the_update_and_is_counted(tmp_path):
    snapshots = {}
    trainer = make_trainer(
        tmp_path,
        max_steps=4,
        nan_at=(3,),
        grad_clip=1.0,
        callbacks=[lambda step: snapshots.__setitem__(step, _trainable(trainer))],
    )
    trainer.fit()
    for name in snapshots[2]:
        assert torch.equal(snapshots[2][name], snapshots[3][name]), name  # step 3 was skipped
        assert not torch.equal(snapshots[3][name], snapshots[4][name]), name  # step 4 was not
    adam_steps = {float(s["step"]) for s in trainer.optimizer.state.values()}
    assert adam_steps == {3.0}
    records = read_metrics(tmp_path)
    assert [r["nonfinite_steps"] for r in records] == [0, 0, 1, 1]
    assert records[2]["loss"] == "nan"  # a window with only the skipped step
    assert math.isfinite(records[3]["loss"])


def test_too_many_nonfinite_steps_stop_the_run(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=6, nan_at=(2, 3), max_nonfinite_steps=1)
    with pytest.raises(NonFiniteLossError, match="2 steps had a NaN"):
        trainer.fit()
    assert trainer.step == 3


def test_resume_in_process_continues_the_same_run(tmp_path):
    ref = make_trainer(tmp_path / "ref", max_steps=6, save_every=2)
    ref.fit()

    class Crash(Exception):
        pass

    def crash(step):
        if step == 3:
            raise Crash

    first = make_trainer(tmp_path / "run", max_steps=6, save_every=2, callbacks=[crash])
    with pytest.raises(Crash):
        first.fit()
    again = make_trainer(tmp_path / "run", max_steps=6, save_every=2)
    assert again.resume() and again.step == 2
    again.fit()
    # the schedules are set for step 2 before the first step of the resumed process
    assert again.objective.steps_set == [2, 3, 4, 5] and again.objective.steps_seen == [3, 4, 5, 6]
    ref_losses = [r["loss"] for r in read_metrics(tmp_path / "ref")]
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == list(range(1, 7))
    assert [r["loss"] for r in read_metrics(tmp_path / "run")] == ref_losses
    for name, value in params(ref.objective).items():
        assert torch.equal(value, params(again.objective)[name]), name


@pytest.mark.cuda
def test_cuda_bf16_step_skips_nonfinite_and_logs_memory(tmp_path):
    snapshots = {}
    trainer = make_trainer(
        tmp_path,
        max_steps=4,
        nan_at=(2,),
        device="cuda",
        precision="bf16",
        grad_clip=1.0,
        callbacks=[lambda step: snapshots.__setitem__(step, _trainable(trainer))],
    )
    trainer.fit()
    assert all(torch.equal(snapshots[1][n], snapshots[2][n]) for n in snapshots[1])
    records = read_metrics(tmp_path)
    assert [r["nonfinite_steps"] for r in records] == [0, 1, 1, 1]
    assert all(r["gpu_max_mem_gb"] > 0 for r in records)
    assert math.isfinite(records[-1]["loss"])


def test_validation_logs_the_mean_over_valid_batches_in_eval_mode(tmp_path):
    from mmssl.train.stream import BatchStream
    from tests.train.toy import ToyBatchSampler, toy_collate, toy_dataset

    trainer = make_trainer(tmp_path, max_steps=2, valid_every=2, dropout=0.5, noise=0.0)
    data = toy_dataset(n=10, seed=1)
    trainer.valid_stream = BatchStream(data, ToyBatchSampler(len(data), 5), toy_collate)
    trainer.fit()
    assert trainer.objective.training  # back in training mode after validating
    record = [r for r in read_metrics(tmp_path) if "valid_loss" in r]
    assert [r["step"] for r in record] == [2]
    objective = trainer.objective.eval()  # dropout off, as during validation
    with torch.no_grad():
        losses = [objective(toy_collate([data[i] for i in b]))["loss"] for b in ToyBatchSampler(10, 5)]
    assert record[0]["valid_loss"] == pytest.approx(float(sum(losses) / 2), rel=1e-5)
    assert trainer.objective.steps_seen == [1, 2]
