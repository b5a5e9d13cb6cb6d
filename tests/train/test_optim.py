import math

import pytest
import torch
from torch import nn

from mmssl.errors import ConfigError
from mmssl.train.optim import Schedule, build_adamw, param_groups


def test_schedules_match_their_formulas():
    lin = Schedule(peak_lr=1.0, total_steps=10, kind="linear", warmup_steps=4, final_scale=0.2)
    assert [lin.lr_at(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    # decay over steps 4..10 from 1 to 0.2
    assert lin.lr_at(7) == pytest.approx(1 + (0.2 - 1) * 3 / 6)
    assert lin.lr_at(10) == pytest.approx(0.2) and lin.lr_at(50) == pytest.approx(0.2)

    cos = Schedule(peak_lr=2.0, total_steps=12, kind="cosine", warmup_steps=2)
    assert cos.lr_at(2) == pytest.approx(2.0)
    assert cos.lr_at(7) == pytest.approx(1.0)  # half-way through the decay: cos(pi/2)
    assert cos.lr_at(4) == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 2 / 10)))

    tri = Schedule(
        peak_lr=1.0,
        total_steps=100,
        kind="tri_stage",
        warmup_steps=10,
        hold_steps=40,
        final_scale=0.05,
        init_scale=0.01,
    )
    assert tri.lr_at(0) == pytest.approx(0.01 + 0.99 * 1 / 10)
    assert tri.lr_at(9) == pytest.approx(1.0) and tri.lr_at(49) == pytest.approx(1.0)
    assert tri.lr_at(75) == pytest.approx(0.05**0.5)  # geometric mid-point of the decay
    assert Schedule(peak_lr=3.0, total_steps=5, kind="constant", warmup_steps=0).lr_at(4) == 3.0


def test_schedule_state_and_bad_kind():
    s = Schedule(peak_lr=1.0, total_steps=10, kind="linear", warmup_steps=2)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.0)
    for _ in range(3):
        s.apply(opt)
        s.advance()
    t = Schedule(peak_lr=1.0, total_steps=10, kind="linear", warmup_steps=2)
    t.load_state_dict(s.state_dict())
    assert t.apply(opt) == s.lr_at(3) == opt.param_groups[0]["lr"]
    with pytest.raises(ConfigError, match="unknown schedule"):
        Schedule(peak_lr=1.0, total_steps=10, kind="poly")


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.lin = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.conv = nn.Conv1d(4, 4, 3)
        self.pos = nn.Parameter(torch.zeros(1, 3, 4))  # a matrix-shaped parameter: decayed
        self.teacher = nn.Linear(4, 4)
        self.teacher.requires_grad_(False)
        self.tied = self.lin  # the same module twice: its parameters once


def test_param_groups_split_decay_and_skip_frozen():
    net = _Net()
    groups = param_groups(net, weight_decay=0.1)
    names = {id(p): n for n, p in net.named_parameters()}
    decay = sorted(names[id(p)] for p in groups[0]["params"])
    no_decay = sorted(names[id(p)] for p in groups[1]["params"])
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert decay == ["conv.weight", "lin.weight", "pos"]
    assert no_decay == ["conv.bias", "emb.weight", "lin.bias", "norm.bias", "norm.weight"]


def test_adamw_skips_the_whole_update_when_found_inf():
    net = _Net()
    opt = build_adamw(net, lr=0.1, weight_decay=0.5)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    for p in net.parameters():
        if p.requires_grad:
            p.grad = torch.ones_like(p)
    opt.found_inf = torch.tensor(1.0)
    opt.step()
    assert all(torch.equal(before[n], p) for n, p in net.named_parameters())
    opt.found_inf = torch.tensor(0.0)
    opt.step()
    assert not torch.equal(before["lin.bias"], net.lin.bias)
    # weight decay only where it belongs: a zero-gradient-free check on the first Adam step
    # (update = lr * (sign + wd * w) for decayed weights, lr * sign for the rest)
    torch.testing.assert_close(net.lin.bias, before["lin.bias"] - 0.1, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        net.lin.weight, before["lin.weight"] * (1 - 0.1 * 0.5) - 0.1, atol=1e-5, rtol=0
    )
    assert torch.equal(net.teacher.weight, before["teacher.weight"])
