import math

import pytest
import torch
import torch.nn.functional as F

from mmssl.errors import ConfigError
from mmssl.nn.padding import lengths_to_padding_mask
from mmssl.objectives.cpc import binary_contrastive
from mmssl.objectives.wav2vec2 import sample_negatives
from mmssl.registry import OBJECTIVES
from mmssl.testing import tiny_audio_batch


def test_binary_loss_matches_hand_computation():
    logits = torch.tensor([[[2.0, -1.0, 0.5], [0.0, 3.0, float("-inf")]]])
    weight = torch.tensor([[True, True]])
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731  softplus
    first = sp(-2.0) + sp(-1.0) + sp(0.5)
    second = sp(0.0) + sp(3.0)  # the missing distractor adds nothing
    loss, acc = binary_contrastive(logits, weight)
    assert abs(loss.item() - (first + second) / 2) < 1e-5 and acc.item() == 0.5
    loss1, _ = binary_contrastive(logits, torch.tensor([[True, False]]))
    assert abs(loss1.item() - first) < 1e-5


def _explicit_loss(model, batch, seed, binary):
    """Recompute the loss with explicit per-pair dot products and F.cross_entropy / sigmoids,
    drawing the distractors from the same random stream as ``forward``."""
    with torch.no_grad():
        z, lengths = model.frontend(batch["audio"], batch["audio_lens"])
        c = model.context(z, lengths)
        b, t, f = z.shape
        valid = ~lengths_to_padding_mask(lengths, t)
        torch.manual_seed(seed)
        terms = []
        for k in range(1, model.num_steps + 1):
            positives = (torch.arange(t) + k).clamp(max=t - 1).expand(b, t)
            negatives, _ = sample_negatives(valid, positives, model.num_negatives)
            w_k = model.predictor.weight[(k - 1) * f : k * f]
            bias = model.predictor.bias[(k - 1) * f : k * f]
            for i in range(b):
                for s in range(int(lengths[i]) - k):
                    pred = w_k @ c[i, s] + bias
                    row = torch.stack([z[i, s + k] @ pred] + [z[i, n] @ pred for n in negatives[i, s]])
                    if binary:
                        terms.append(F.softplus(-row[0]) + F.softplus(row[1:]).sum())
                    else:
                        terms.append(F.cross_entropy(row[None], torch.zeros(1, dtype=torch.long)))
        return torch.stack(terms).mean()


@pytest.mark.parametrize("name", ["cpc", "wav2vec"])
def test_loss_equals_explicit_logits(name):
    torch.manual_seed(0)
    model = OBJECTIVES.build(name, size="tiny", num_steps=3, num_negatives=4)
    batch = tiny_audio_batch((4000, 2800, 1600))
    torch.manual_seed(11)
    out = model(batch)
    expected = _explicit_loss(model, batch, 11, binary=name == "wav2vec")
    assert torch.allclose(out["loss"], expected, atol=1e-4)
    out["loss"].backward()
    assert model.predictor.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("context", ["gru", "transformer"])
def test_padding_values_change_no_loss(context):
    torch.manual_seed(0)
    model = OBJECTIVES.build("cpc", size="tiny", context=context)
    batch = tiny_audio_batch()
    noisy = dict(batch, audio=batch["audio"].clone())
    for i, n in enumerate(batch["audio_lens"].tolist()):
        noisy["audio"][i, n:] = torch.randn(batch["audio"].shape[1] - n)
    torch.manual_seed(3)
    a = model(batch)["loss"]
    torch.manual_seed(3)
    b = model(noisy)["loss"]
    assert torch.allclose(a, b, atol=1e-5)


def test_unknown_options_are_config_errors():
    with pytest.raises(ConfigError, match="depth"):
        OBJECTIVES.build("cpc", size="tiny", encoder={"depth": 3})
    with pytest.raises(ConfigError, match="context"):
        OBJECTIVES.build("wav2vec", size="tiny", context="conv")


@pytest.mark.parametrize("name", ["cpc", "wav2vec"])
def test_loss_falls_when_overfitting_one_batch(name):
    torch.manual_seed(1)
    model = OBJECTIVES.build(name, size="tiny", num_steps=4)
    batch = tiny_audio_batch()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        out = model(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert sum(losses[-5:]) < 0.85 * sum(losses[:5])
