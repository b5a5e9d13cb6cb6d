import math

import pytest
import torch
import torch.nn.functional as F

from mmssl.errors import DataError
from mmssl.nn.contrastive import LogitScale, symmetric_info_nce
from mmssl.objectives.multiview_contrastive import frame_info_nce, multiview_contrastive
from mmssl.registry import OBJECTIVES
from mmssl.testing import overfit, tiny_av_batch


def _unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def utterance_info_nce(za, zv, scale, rank=0, world_size=1, **kwargs):
    """The utterance term as the objective computes it: the shared InfoNCE, no groups."""
    loss, acc, _ = symmetric_info_nce(za, zv, scale, None, rank, world_size, **kwargs)
    return loss, acc


def test_utterance_info_nce_is_cross_entropy_on_explicit_logits():
    za, zv = _unit(4, 6, seed=0), _unit(4, 6, seed=1)
    scale = torch.tensor(10.0)
    loss, acc = utterance_info_nce(za, zv, scale)
    logits = 10.0 * za @ zv.T
    labels = torch.arange(4)
    ref = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    torch.testing.assert_close(loss, ref)
    assert acc.item() == (logits.argmax(1) == labels).float().mean().item()


@pytest.mark.parametrize("other_rows", [3, 4])
def test_utterance_negatives_come_from_every_rank(other_rows):
    # rank 1 of 2: the other rank's rows come first; labels are offset by the other rank's B
    za, zv = _unit(3, 5, seed=2), _unit(3, 5, seed=3)
    other_a, other_v = _unit(other_rows, 5, seed=4), _unit(other_rows, 5, seed=5)

    def fake_gather(x, rank, world_size):
        assert (rank, world_size) == (1, 2)
        torch.testing.assert_close(x, torch.cat([za, zv], 1))  # both views in one gather
        return torch.cat([torch.cat([other_a, other_v], 1), x]), [other_rows, 3]

    loss, _ = utterance_info_nce(za, zv, torch.tensor(5.0), rank=1, world_size=2, gather=fake_gather)
    all_a, all_v = torch.cat([other_a, za]), torch.cat([other_v, zv])
    labels = torch.arange(3) + other_rows
    ref = 0.5 * (F.cross_entropy(5.0 * za @ all_v.T, labels) + F.cross_entropy(5.0 * zv @ all_a.T, labels))
    torch.testing.assert_close(loss, ref)


def test_frame_info_nce_matches_explicit_valid_frames():
    za, zv = _unit(3, 4, 6, seed=6), _unit(3, 4, 6, seed=7)
    lengths = torch.tensor([4, 2, 3])
    scale = torch.tensor(7.0)
    loss, acc = frame_info_nce(za, zv, lengths, scale)
    keep = torch.arange(4)[None] < lengths[:, None]
    fa, fv = za[keep], zv[keep]  # (N, D) valid frames only, same order
    labels = torch.arange(fa.shape[0])
    logits = 7.0 * fa @ fv.T
    ref = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(acc, (logits.argmax(1) == labels).float().mean())


def test_frame_info_nce_ignores_padded_content():
    za, zv = _unit(2, 5, 4, seed=8), _unit(2, 5, 4, seed=9)
    lengths = torch.tensor([5, 2])
    base, _ = frame_info_nce(za, zv, lengths, torch.tensor(3.0))
    za2, zv2 = za.clone(), zv.clone()
    za2[1, 2:] = za[0, :3]  # padding that would be a perfect match if it counted
    zv2[1, 2:] = za[0, :3]
    other, _ = frame_info_nce(za2, zv2, lengths, torch.tensor(3.0))
    torch.testing.assert_close(base, other)


def test_logit_scale_init_and_clamp():
    s = LogitScale()
    torch.testing.assert_close(s(), torch.tensor(1 / 0.07))
    with torch.no_grad():
        s.log_scale.fill_(10.0)
    torch.testing.assert_close(s(), torch.tensor(100.0))
    s.log_scale.grad = None
    s().backward()
    assert s.log_scale.grad == 0  # clamped in forward: no gradient above the cap


def test_on_step_brings_both_scales_back_to_the_cap_where_they_learn_again():
    torch.manual_seed(0)
    objective = OBJECTIVES.build("multiview_contrastive", size="tiny", dim=8)
    scales = (objective.utterance_scale, objective.frame_scale)
    opt = torch.optim.SGD([s.log_scale for s in scales], lr=1.0)
    with torch.no_grad():
        for s in scales:
            s.log_scale.fill_(math.log(100) - 0.1)
    opt.zero_grad()
    (-(scales[0]() + scales[1]())).backward()  # a step that pushes both above log 100
    opt.step()
    assert all(s.log_scale.item() > math.log(100) + 1 for s in scales)
    objective.on_step(1)
    for s in scales:
        assert s.log_scale.item() == pytest.approx(math.log(100))
        s.log_scale.grad = None
        s().backward()
        assert s.log_scale.grad.item() == pytest.approx(100.0)  # d exp(x) / dx at the cap


def test_forward_backward_and_overfit():
    torch.manual_seed(0)
    objective = OBJECTIVES.build("multiview_contrastive", size="tiny", dim=16)
    batch = tiny_av_batch()
    out = objective(batch)
    for key in ("loss", "utterance_loss", "frame_loss", "utterance_accuracy", "frame_accuracy"):
        assert key in out and torch.isfinite(out[key])
    torch.testing.assert_close(out["loss"], out["utterance_loss"] + out["frame_loss"])
    # chance level of the utterance loss at initialisation is about log(B)
    assert abs(out["utterance_loss"].item() - math.log(3)) < 1.5
    out["loss"].backward()
    assert not [n for n, p in objective.named_parameters() if p.grad is None]
    losses = overfit(objective.eval(), batch, steps=16, lr=3e-3)  # no dropout: a fixed batch, a falling loss
    assert losses[-1] < losses[0] - 0.1  # after 15 updates


def test_needs_paired_views():
    batch = tiny_av_batch()
    del batch["audio"]
    with pytest.raises(DataError, match="audio"):
        multiview_contrastive(size="tiny", dim=8)(batch)


def test_recipe_builds():
    from mmssl.config import builder_kwargs, load_config, resolve

    cfg = resolve(load_config("multiview", ["data.train=m.jsonl", "model.size=tiny", "objective.dim=8"]))
    kwargs = {**builder_kwargs(cfg.objective), **builder_kwargs(cfg.model, drop=())}
    obj = OBJECTIVES.build(cfg.objective.name, **kwargs, rank=0, world_size=1)
    assert torch.isfinite(obj(tiny_av_batch())["loss"])


def _rank_worker(rank, world_size, init, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world_size)
    za, zv = _unit(6, 4, seed=10), _unit(6, 4, seed=11)
    a = za[rank * 3 : (rank + 1) * 3].clone().requires_grad_()
    v = zv[rank * 3 : (rank + 1) * 3].clone().requires_grad_()
    loss, _ = utterance_info_nce(a, v, torch.tensor(5.0), rank, world_size)
    loss.backward()
    out[rank, :, :8] = torch.cat([a.grad, v.grad], 1)
    out[rank, :, 8] = loss.detach()
    dist.destroy_process_group()


def test_two_ranks_equal_one_process_on_the_whole_batch(tmp_path):
    import torch.multiprocessing as mp

    out = torch.zeros(2, 3, 9).share_memory_()
    # fork: the workers inherit the imported modules instead of importing them again
    mp.start_processes(
        _rank_worker, args=(2, f"file://{tmp_path / 'pg'}", out), nprocs=2, start_method="fork"
    )
    za = _unit(6, 4, seed=10).requires_grad_()
    zv = _unit(6, 4, seed=11).requires_grad_()
    loss, _ = utterance_info_nce(za, zv, torch.tensor(5.0))
    loss.backward()
    # DDP averages over ranks: the mean of the ranks' losses and gradients is the whole batch's
    torch.testing.assert_close(out[:, 0, 8].mean(), loss.detach())
    torch.testing.assert_close(out[:, :, :8].reshape(6, 8) / 2, torch.cat([za.grad, zv.grad], 1))


def _unequal_rank_worker(rank, world_size, init, sizes, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world_size)
    start, n, total = sum(sizes[:rank]), sizes[rank], sum(sizes)
    za, zv = _unit(total, 4, seed=12), _unit(total, 4, seed=13)
    a = za[start : start + n].clone().requires_grad_()
    v = zv[start : start + n].clone().requires_grad_()
    loss, _ = utterance_info_nce(a, v, torch.tensor(5.0), rank, world_size)
    # the combined batch's loss is the ranks' losses weighted by their share of the utterances
    (loss * n / total).backward()
    out[start : start + n, :8] = torch.cat([a.grad, v.grad], 1)
    out[start : start + n, 8] = loss.detach()
    dist.destroy_process_group()


def test_two_ranks_with_unequal_batches_equal_one_process(tmp_path):
    # the duration-bucketed sampler gives each rank its own B: here 3 and 2 utterances
    import torch.multiprocessing as mp

    sizes = (3, 2)
    out = torch.zeros(5, 9).share_memory_()
    mp.start_processes(
        _unequal_rank_worker, args=(2, f"file://{tmp_path / 'pg'}", sizes, out), nprocs=2, start_method="fork"
    )
    za = _unit(5, 4, seed=12).requires_grad_()
    zv = _unit(5, 4, seed=13).requires_grad_()
    loss, _ = utterance_info_nce(za, zv, torch.tensor(5.0))
    loss.backward()
    rank_losses = out[[0, 3], 8]
    torch.testing.assert_close((rank_losses * torch.tensor(sizes)).sum() / 5, loss.detach())
    torch.testing.assert_close(out[:, :8], torch.cat([za.grad, zv.grad], 1))
