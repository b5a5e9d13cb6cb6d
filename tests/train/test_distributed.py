"""Two CPU processes (gloo) against one process on the combined batch."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mmssl.nn.gather import gather_no_grad, gather_with_grad, gather_with_grad_and_offset
from mmssl.runs import load_weights
from mmssl.train.distributed import DistEnv
from tests.train.toy import make_trainer, params, read_metrics


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, *args):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(_free_port())
    # forkserver: children fork from a clean single-threaded server, not from this process
    # (forking a process that already trained can deadlock), and torch is imported only once
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "tests.train.toy"])
    mp.start_processes(fn, args=args, nprocs=2, start_method="forkserver")


def _init(rank):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)


class _Crash(Exception):
    pass


def _crash_after_3(step):
    if step == 3:
        raise _Crash


def _train(rank, run_dir, strategy, phase):
    options = dict(
        max_steps=4,
        batch_size=2,
        env=DistEnv(rank, 2, rank),
        strategy=strategy,
        dropout=0.0,
        noise=0.0,
        grad_clip=1.0,
        save_every=2,
    )
    trainer = make_trainer(run_dir, callbacks=[_crash_after_3] if phase == "crash" else [], **options)
    if phase == "resume":
        assert trainer.resume() and trainer.step == 2
    try:
        trainer.fit()  # ends with a checkpoint: full tensors gathered from the shards
    except _Crash:
        pass


def _train_rank(rank, run_dir, strategy, phase):
    """``phase``: "all" trains 4 steps; "crash" stops after step 3 (last checkpoint: step 2);
    "resume" continues from that checkpoint in fresh processes, as a restarted job would."""
    _init(rank)
    try:
        _train(rank, run_dir, strategy, phase)  # the wrapped model is freed before the group
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "strategy,interrupted", [("ddp", False), ("ddp", True), ("fsdp", False), ("fsdp", True)]
)
def test_two_processes_match_one_on_the_combined_batch(tmp_path, strategy, interrupted):
    single = make_trainer(tmp_path / "one", max_steps=4, batch_size=4, dropout=0.0, noise=0.0, grad_clip=1.0)
    single.fit()
    for phase in ("crash", "resume") if interrupted else ("all",):
        _spawn(_train_rank, tmp_path / "two", strategy, phase)
    two = load_weights(tmp_path / "two")  # no wrapper prefix in checkpoint names
    one = params(single.objective)
    assert two.keys() == one.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6, msg=name)
    # logged losses are the rank mean, i.e. the mean over the combined batch
    assert [r["loss"] for r in read_metrics(tmp_path / "two")] == pytest.approx(
        [r["loss"] for r in read_metrics(tmp_path / "one")], rel=1e-5
    )


def _contrastive(local, everyone, offset):
    """InfoNCE of each local row against every row; positives on the diagonal block."""
    logits = local @ everyone.T / 0.1
    labels = torch.arange(local.shape[0]) + offset
    return torch.nn.functional.cross_entropy(logits, labels)


def _gather_rank(rank, x_all, out):
    _init(rank)
    try:
        x = x_all[2 * rank : 2 * rank + 2].clone().requires_grad_(True)
        everyone = gather_with_grad(x, rank, 2)
        torch.testing.assert_close(everyone, x_all)
        _contrastive(x, everyone, 2 * rank).backward()
        torch.save(x.grad, out / f"grad{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_gather_with_grad_matches_one_process(tmp_path):
    x_all = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    _spawn(_gather_rank, x_all, tmp_path)
    # one process: the sum over ranks of each rank's loss, on the same rows
    x = x_all.clone().requires_grad_(True)
    sum(_contrastive(x[2 * r : 2 * r + 2], x, 2 * r) for r in range(2)).backward()
    for rank in range(2):
        got = torch.load(tmp_path / f"grad{rank}.pt", weights_only=True)
        torch.testing.assert_close(got, x.grad[2 * rank : 2 * rank + 2])


def test_gather_with_one_process_is_identity():
    x = torch.randn(2, 3)
    assert gather_with_grad(x, 0, 1) is x
    everyone, offset = gather_with_grad_and_offset(x, 0, 1)
    assert everyone is x and offset == 0
    assert gather_no_grad(x, 1) is x


_UNEQUAL = (3, 2)  # rows per rank, as the duration-bucketed sampler may give them


def _gather_unequal_rank(rank, x_all, out):
    _init(rank)
    try:
        start, n = sum(_UNEQUAL[:rank]), _UNEQUAL[rank]
        x = x_all[start : start + n].clone().requires_grad_(True)
        everyone, offset = gather_with_grad_and_offset(x, rank, 2)
        assert offset == start
        torch.testing.assert_close(everyone, x_all)  # 5 rows, rank order, no padding rows
        torch.testing.assert_close(gather_with_grad(x, rank, 2), x_all)
        torch.testing.assert_close(gather_no_grad(x, 2), x_all)
        # integer rows too (lengths, labels): the padding must not leak into the result
        assert gather_no_grad(torch.arange(n) + start, 2).tolist() == list(range(sum(_UNEQUAL)))
        _contrastive(x, everyone, offset).backward()
        torch.save(x.grad, out / f"grad{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_gather_with_unequal_rows_per_rank(tmp_path):
    x_all = torch.randn(sum(_UNEQUAL), 3, generator=torch.Generator().manual_seed(1))
    _spawn(_gather_unequal_rank, x_all, tmp_path)
    # one process: the sum over ranks of each rank's loss, on the same rows
    x = x_all.clone().requires_grad_(True)
    starts = [0, _UNEQUAL[0]]
    sum(_contrastive(x[s : s + n], x, s) for s, n in zip(starts, _UNEQUAL)).backward()
    for rank, (s, n) in enumerate(zip(starts, _UNEQUAL)):
        got = torch.load(tmp_path / f"grad{rank}.pt", weights_only=True)
        assert got.shape == (n, 3)
        torch.testing.assert_close(got, x.grad[s : s + n])
