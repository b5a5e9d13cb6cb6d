import math

import torch
import torch.nn.functional as F

from mmssl.nn.quantizer import GumbelProductQuantizer, batch_perplexity, diversity_loss


def test_diversity_loss_is_zero_for_uniform_code_use():
    groups, entries = 2, 8
    # every frame picks a different entry: the batch average is uniform in each group
    onehot = F.one_hot(torch.arange(entries), entries).float()  # (V, V)
    probs = onehot[:, None, :].expand(entries, groups, entries).reshape(1, entries, groups, entries)
    ppl = batch_perplexity(probs)
    assert torch.isclose(ppl, torch.tensor(float(groups * entries)))
    assert abs(diversity_loss(ppl, groups, entries).item()) < 1e-6


def test_perplexity_matches_hand_computed_entropy():
    # two frames, one group of two entries: [0.5, 0.5] and [1, 0] average to [0.75, 0.25]
    probs = torch.tensor([[[[0.5, 0.5]], [[1.0, 0.0]]]])  # (1, 2, 1, 2)
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert torch.isclose(batch_perplexity(probs), torch.tensor(math.exp(entropy)), atol=1e-5)
    collapsed = torch.zeros(1, 4, 2, 5)
    collapsed[..., 0] = 1.0
    ppl = batch_perplexity(collapsed)
    assert torch.isclose(ppl, torch.tensor(2.0))
    assert torch.isclose(diversity_loss(ppl, 2, 5), torch.tensor((10 - 2) / 10))


def test_padding_weight_keeps_padded_frames_out():
    torch.manual_seed(0)
    probs = torch.rand(2, 6, 2, 4).softmax(-1)
    weight = torch.ones(2, 6)
    weight[1, 3:] = 0
    other = probs.clone()
    other[1, 3:] = torch.rand(3, 2, 4).softmax(-1)
    assert torch.allclose(batch_perplexity(probs, weight), batch_perplexity(other, weight))
    alone = torch.cat([probs[0], probs[1, :3]])[None]
    assert torch.allclose(batch_perplexity(probs, weight), batch_perplexity(alone))


def test_straight_through_output_is_codebook_entries_and_grads_flow():
    torch.manual_seed(0)
    q = GumbelProductQuantizer(input_dim=12, dim=8, groups=2, entries=5)
    x = torch.randn(2, 7, 12, requires_grad=True)
    out = q(x)
    assert out.quantized.shape == (2, 7, 8) and out.codes.shape == (2, 7, 2)
    expected = torch.cat([q.codebook[g][out.codes[..., g]] for g in range(2)], dim=-1)
    assert torch.allclose(out.quantized, expected)
    out.quantized.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert q.weight_proj.weight.grad.abs().sum() > 0


def test_eval_picks_the_argmax_entry():
    torch.manual_seed(1)
    q = GumbelProductQuantizer(input_dim=6, dim=4, groups=2, entries=3).eval()
    x = torch.randn(1, 5, 6)
    scores = q.weight_proj(x).view(1, 5, 2, 3)
    assert torch.equal(q(x).codes, scores.argmax(-1))


def test_temperature_anneals_and_floors():
    q = GumbelProductQuantizer(input_dim=4, dim=4)
    q.set_step(0)
    assert q.temperature == 2.0
    q.set_step(100_000)
    assert math.isclose(q.temperature, 2.0 * 0.999995**100_000)
    q.set_step(10_000_000)
    assert q.temperature == 0.5
