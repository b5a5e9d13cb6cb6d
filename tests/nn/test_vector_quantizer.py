import math

import pytest
import torch

from mmssl.errors import ConfigError
from mmssl.nn.quantizer import VectorQuantizer


def _quantizer(book: list[list[float]], **kwargs) -> VectorQuantizer:
    q = VectorQuantizer(dim=len(book[0]), entries=len(book), **kwargs)
    with torch.no_grad():
        q.codebook.copy_(torch.tensor(book))
        if q.uses_ema:
            q.ema_sum.copy_(torch.tensor(book))
    return q


BOOK = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [3.0, 3.0]]


def test_each_frame_takes_its_nearest_entry():
    q = _quantizer(BOOK).eval()
    z = torch.tensor([[[0.9, 0.1], [0.1, 0.2], [0.2, 0.8], [2.0, 1.9], [0.6, 0.45]]])  # (1, 5, 2)
    out = q(z, torch.tensor([5]))
    # [0.6, 0.45]: distance^2 to e1 = 0.16 + 0.2025, to e0 = 0.36 + 0.2025 -> e1
    assert out.codes.tolist() == [[1, 0, 2, 3, 1]]
    assert torch.equal(out.quantized, torch.tensor(BOOK)[out.codes])


def test_straight_through_gradient_is_the_gradient_wrt_the_quantised_vector():
    q = _quantizer(BOOK)
    z = torch.tensor([[[0.9, 0.1], [0.1, 0.2], [0.2, 0.8]]], requires_grad=True)
    out = q(z, torch.tensor([3]))
    upstream = torch.randn(1, 3, 2)
    (out.quantized * upstream).sum().backward(inputs=[z])
    assert torch.allclose(z.grad, upstream)


def test_losses_match_the_formula_and_leave_padding_out():
    q = _quantizer(BOOK, beta=0.25)
    z = torch.tensor([[[0.9, 0.1], [0.1, 0.2]], [[0.2, 0.8], [50.0, -7.0]]], requires_grad=True)
    out = q(z, torch.tensor([2, 1]))  # the last frame is padding
    e = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    zz = torch.tensor([[0.9, 0.1], [0.1, 0.2], [0.2, 0.8]])
    mse = ((zz - e) ** 2).mean()  # over 3 frames x 2 dims
    assert torch.isclose(out.codebook_loss, mse) and torch.isclose(out.commitment_loss, mse)
    assert torch.isclose(out.loss, mse * 1.25)
    out.loss.backward()
    # d/dz of beta * ||z - sg[e]||^2 / (N D); the codebook term sends nothing to z
    assert torch.allclose(z.grad[0], 0.25 * 2 * (zz[:2] - e[:2]) / 6)
    assert torch.all(z.grad[1, 1] == 0)
    # d/de_1 of ||sg[z] - e||^2 / (N D): only frame 0 picked entry 1
    assert torch.allclose(q.codebook.grad[1], 2 * (e[0] - zz[0]) / 6)
    assert torch.all(q.codebook.grad[3] == 0)  # entry 3 (nearest to the padded frame) is untouched


def test_ema_update_matches_hand_computation():
    decay, eps = 0.9, 1e-5
    q = _quantizer(BOOK, ema_decay=decay, epsilon=eps).train()
    z = torch.tensor([[[0.8, 0.0], [1.2, 0.2], [0.1, 0.9], [9.0, 9.0]]])
    out = q(z, torch.tensor([3]))  # frame 3 is padding: it must not move entry 3
    assert out.codes[0, :3].tolist() == [1, 1, 2]
    counts = torch.tensor([0.0, 2.0, 1.0, 0.0])
    sums = torch.tensor([[0.0, 0.0], [2.0, 0.2], [0.1, 0.9], [0.0, 0.0]])
    n = decay * torch.ones(4) + (1 - decay) * counts  # cluster sizes start at 1
    m = decay * torch.tensor(BOOK) + (1 - decay) * sums
    total = n.sum()
    smoothed = (n + eps) / (total + 4 * eps) * total
    assert torch.allclose(q.cluster_size, n)
    assert torch.allclose(q.codebook, m / smoothed[:, None], atol=1e-6)
    # with EMA the codebook is not trained by gradient: the loss is beta * commitment only
    assert torch.isclose(out.loss, 0.25 * out.commitment_loss)
    assert not isinstance(q.codebook, torch.nn.Parameter)


def test_eval_mode_changes_nothing():
    q = _quantizer(BOOK, ema_decay=0.99, restart_threshold=1.0).eval()
    before = q.state_dict()
    before = {k: v.clone() for k, v in before.items()}
    q(torch.randn(2, 5, 2), torch.tensor([5, 3]))
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())


def test_dead_entries_restart_on_valid_frames_only():
    torch.manual_seed(0)
    q = _quantizer(BOOK, restart_threshold=0.995).train()
    z = torch.tensor([[[0.9, 0.1], [0.1, 0.2], [0.0, 0.9]], [[1.1, 0.0], [7.0, 7.0], [7.0, 7.0]]])
    lengths = torch.tensor([3, 1])
    q(z, lengths)
    # decay 0.99 on counts starting at 1: entry 3 (never used by a valid frame) drops to 0.99
    book = q.codebook.detach()
    assert torch.equal(book[:3], torch.tensor(BOOK[:3]))
    frames = torch.tensor([[0.9, 0.1], [0.1, 0.2], [0.0, 0.9], [1.1, 0.0]])
    assert (book[3] == frames).all(1).any(), "entry 3 must be one of the valid frames"
    assert torch.isclose(q.cluster_size[3], torch.tensor(0.995))


@pytest.mark.parametrize("ema", [True, False])
def test_a_nan_frame_leaves_every_buffer_as_it_was_and_the_next_batch_trains(ema):
    torch.manual_seed(0)
    q = _quantizer(BOOK, ema_decay=0.9 if ema else None, restart_threshold=0.995).train()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    z = torch.tensor([[[0.9, 0.1], [float("nan"), 0.2], [0.0, 0.9]], [[1.1, 0.0], [7.0, 7.0], [7.0, 7.0]]])
    out = q(z, torch.tensor([3, 1]))
    assert not torch.isfinite(out.loss)  # the trainer skips this step ...
    # ... and the quantizer kept nothing of it: no moving average, no count, no restart
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())
    clean = torch.tensor([[[0.9, 0.1], [0.1, 0.2], [0.0, 0.9]]])
    out = q(clean, torch.tensor([3]))
    assert (
        torch.isfinite(out.loss) and torch.isfinite(q.codebook).all() and torch.isfinite(q.cluster_size).all()
    )
    assert not torch.equal(before["cluster_size"], q.cluster_size)  # a clean batch does update


def test_nan_in_padding_reaches_no_loss_and_no_statistic():
    z = torch.tensor([[[0.8, 0.0], [1.2, 0.2], [0.1, 0.9], [9.0, 9.0]]])
    padded_nan = z.clone()
    padded_nan[0, 3] = float("nan")
    results = []
    for frames in (z, padded_nan):
        torch.manual_seed(0)
        q = _quantizer(BOOK, ema_decay=0.9, restart_threshold=0.95).train()
        out = q(frames, torch.tensor([3]))
        results.append((out.loss, out.commitment_loss, q.codebook.clone(), q.cluster_size.clone()))
    for a, b in zip(*results):
        assert torch.isfinite(b).all() and torch.equal(a, b)


@pytest.mark.parametrize("ema", [True, False])
def test_training_step_runs_on_the_meta_device(ema):
    """Meta tensors hold no data: ``.item()``, ``bool(tensor)`` and boolean-mask indexing raise
    there, so a full step on them shows the update needs no host sync (checked without a GPU)."""
    with torch.device("meta"):
        q = VectorQuantizer(4, 8, ema_decay=0.99 if ema else None, restart_threshold=1.0).train()
        z = torch.randn(2, 5, 4, requires_grad=True)
    out = q(z, torch.tensor([5, 3], device="meta"))
    out.loss.backward()
    assert z.grad is not None and z.grad.shape == z.shape
    assert (q.codebook.grad is None) == ema


def test_perplexity_and_usage_by_hand():
    q = _quantizer(BOOK).eval()
    # codes of the valid frames: 1, 1, 2, 0 -> p = [1/4, 1/2, 1/4, 0]
    z = torch.tensor([[[0.9, 0.0], [1.1, 0.0], [0.0, 1.0], [0.0, 0.0], [3.0, 3.0]]])
    out = q(z, torch.tensor([4]))
    entropy = -(0.25 * math.log(0.25) * 2 + 0.5 * math.log(0.5))
    assert torch.isclose(out.perplexity, torch.tensor(math.exp(entropy)), atol=1e-5)
    assert torch.isclose(out.usage, torch.tensor(0.75))


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="ema_decay"):
        VectorQuantizer(4, 8, ema_decay=1.5)
    with pytest.raises(ConfigError, match="entries"):
        VectorQuantizer(4, 1)


def _ema_rank(rank, z_all, lengths_all, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(rank)  # restart draws differ per rank; rank 0's must win
        q = _quantizer(BOOK, ema_decay=0.9, restart_threshold=0.95, world_size=2).train()
        q(z_all[rank : rank + 1], lengths_all[rank : rank + 1])
        torch.save({"codebook": q.codebook, "cluster_size": q.cluster_size}, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ema_codebook_is_the_same_on_every_rank_and_matches_one_process(tmp_path):
    import os
    import socket

    import torch.multiprocessing as mp

    z = torch.tensor([[[0.9, 0.1], [1.2, 0.0], [0.1, 0.9]], [[0.2, 1.1], [1.0, 0.2], [9.0, 9.0]]])
    lengths = torch.tensor([3, 2])  # rank 1's last frame is padding
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(s.getsockname()[1])
    ctx = mp.get_context("forkserver")  # children fork from a clean server with torch imported once
    ctx.set_forkserver_preload(["torch", "mmssl.nn.quantizer"])
    mp.start_processes(_ema_rank, args=(z, lengths, tmp_path), nprocs=2, start_method="forkserver")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert torch.equal(ranks[0]["codebook"], ranks[1]["codebook"])
    single = _quantizer(BOOK, ema_decay=0.9).train()
    single(z, lengths)  # the combined batch in one process, no restarts
    # entries 1 and 2 were used: EMA of the frames of both ranks; entries 0 and 3 (unused,
    # counts 0.9 < 0.95) were restarted on the same valid frame on both ranks
    assert torch.allclose(ranks[0]["cluster_size"][1:3], single.cluster_size[1:3])
    assert torch.allclose(ranks[0]["codebook"][1:3], single.codebook[1:3], atol=1e-6)
    frames = torch.cat([z[0], z[1, :2]])
    for entry in (0, 3):
        assert (ranks[0]["codebook"][entry] == frames).all(1).any()
