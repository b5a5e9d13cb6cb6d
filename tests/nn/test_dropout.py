import pytest
import torch
import torch.nn.functional as F

from mmssl.nn.dropout import Dropout, dropout


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_cpu_dropout_keeps_one_minus_p_and_scales_kept_values(p):
    torch.manual_seed(0)
    x = torch.rand(200_000) + 1.0  # no zeros of its own
    y = dropout(x, p)
    kept = y != 0
    # 200k Bernoulli(1 - p) draws: the kept share is within 5 standard deviations of 1 - p
    sd = (p * (1 - p) / x.numel()) ** 0.5
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * sd
    assert torch.allclose(y[kept], x[kept] / (1 - p))


def test_cpu_dropout_gradient_is_the_same_mask_and_scale():
    torch.manual_seed(1)
    x = torch.randn(64, 32, requires_grad=True)
    y = dropout(x, 0.3)
    y.sum().backward()
    expected = (y != 0).float() / 0.7
    assert torch.allclose(x.grad, expected)


def test_cpu_dropout_is_reproducible_from_the_torch_seed_and_differs_between_draws():
    x = torch.ones(1000)
    torch.manual_seed(3)
    a, b = dropout(x, 0.5), dropout(x, 0.5)
    torch.manual_seed(3)
    assert torch.equal(dropout(x, 0.5), a)
    assert not torch.equal(a, b)


def test_outside_training_and_at_the_edges_it_is_f_dropout():
    x = torch.randn(50)
    assert torch.equal(dropout(x, 0.5, training=False), x)
    assert torch.equal(dropout(x, 0.0), x)
    assert torch.equal(dropout(x, 1.0), F.dropout(x, 1.0, True))  # all zeros
    module = Dropout(0.5).eval()
    assert torch.equal(module(x), x)
    assert module.p == 0.5 and isinstance(module, torch.nn.Dropout)


def test_module_in_training_drops():
    torch.manual_seed(0)
    y = Dropout(0.5).train()(torch.ones(1000))
    assert set(y.unique().tolist()) == {0.0, 2.0}
