import math

import pytest
import torch
import torch.nn.functional as F

from mmssl.data.io import load_audio
from mmssl.errors import ConfigError
from mmssl.nn.contrastive import sample_negatives
from mmssl.nn.padding import lengths_to_padding_mask
from mmssl.objectives.cpc import binary_contrastive
from mmssl.registry import OBJECTIVES
from mmssl.testing import noisy_padding, overfit, save_tiny_run, tiny_audio_batch


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
        z, lengths = model.encoder.frontend(batch["audio"], batch["audio_lens"])
        c = model.encoder.context(z, lengths)
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
    noisy = noisy_padding(batch)
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
    losses = overfit(model, batch, steps=40, lr=3e-3)
    assert sum(losses[-5:]) < 0.85 * sum(losses[:5])


@pytest.mark.parametrize("name", ["cpc", "wav2vec"])
def test_objective_holds_its_encoder_and_kmeans_reads_its_layers(tmp_path, name):
    """A CPC / wav2vec run exposes ``.encoder``: ``mmssl kmeans --checkpoint --layer`` labels
    every record at the encoder's 100 Hz with the nearest centroid of that layer's frames."""
    from mmssl.cli import main
    from mmssl.nn.kmeans import nearest
    from mmssl.runs import load_encoder_from_run
    from tests.commands.test_kmeans import _corpus, _km_lines

    manifest = _corpus(tmp_path, count=3)
    objective, step = save_tiny_run(tmp_path / "run", name, manifest, overrides=["objective.num_steps=2"])
    assert {k.split(".")[0] for k in objective.state_dict()} == {"encoder", "predictor"}
    encoder = load_encoder_from_run(step)
    assert not encoder.training
    for key, value in objective.encoder.state_dict().items():
        assert torch.equal(encoder.state_dict()[key], value), key
    out = tmp_path / "km"
    code = main(
        [
            "kmeans",
            "--manifest",
            str(manifest),
            "--checkpoint",
            str(step),
            "--layer",
            "2",
            "--k",
            "2",
            "--out",
            str(out),
            "--fit-fraction",
            "1.0",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    state = torch.load(out / "kmeans.pt", weights_only=True)
    assert state["label_rate"] == 100.0 and state["centroids"].shape == (2, encoder.dim)
    for i, line in enumerate(_km_lines(out / "train.km")):
        wav = load_audio(tmp_path / "wav" / f"u{i}.wav")
        with torch.no_grad():
            feats = encoder.extract(wav[None], torch.tensor([wav.shape[0]]))
            layer = encoder.contextualize(feats.x, feats.lengths).layers[1][0]
        assert len(line) == int(feats.lengths[0]) == 1 + (wav.shape[0] - 465) // 160  # 100 Hz frames
        assert line == nearest(layer, state["centroids"])[0].tolist()
