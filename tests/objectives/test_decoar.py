import json

import pytest
import torch

from mmssl.cli import main
from mmssl.encoders.recurrent import reverse_padded
from mmssl.errors import ConfigError
from mmssl.eval.extract import load_features, read_index
from mmssl.objectives.decoar import decoar
from mmssl.testing import alone_average, meta_step, overfit, tiny_audio_batch


def _model(slice_size: int = 4):
    torch.manual_seed(0)
    return decoar(size="tiny", slice_size=slice_size)


def test_reverse_padded_reverses_valid_frames_and_keeps_padding():
    x = torch.arange(10.0).view(2, 5, 1)
    y = reverse_padded(x, torch.tensor([5, 3]))
    assert y[:, :, 0].tolist() == [[4, 3, 2, 1, 0], [7, 6, 5, 8, 9]]
    assert torch.equal(reverse_padded(y, torch.tensor([5, 3])), x)


def test_slice_targets_and_inputs_by_hand():
    """K = 2 on a 6-frame utterance padded to 8: slice t holds x_t, x_{t+1}, x_{t+2} and is
    predicted from [fwd_t; bwd_{t+2}]; slices t = 0..3 are complete."""
    model = _model(slice_size=2).eval()
    enc = model.encoder
    torch.manual_seed(1)
    x = torch.randn(1, 8, enc.feature_dim)
    x[:, 6:] = 0
    lengths = torch.tensor([6])
    with torch.no_grad():
        forward, backward = enc.directions(x, lengths)
        z, weight = model.slice_inputs(x, lengths)
        pred = model.heads(z).view(1, 8, 3, enc.feature_dim)
    assert weight[0].tolist() == [True] * 4 + [False] * 4
    total = 0.0
    for t in range(4):
        assert torch.allclose(z[0, t], torch.cat([forward[-1][0, t], backward[-1][0, t + 2]]))
        for i in range(3):
            total += (pred[0, t, i] - x[0, t + i]).abs().sum().item()
    loss, slices = model.slice_loss(x, lengths)
    assert abs(loss.item() - total / (4 * 3 * enc.feature_dim)) < 1e-5 and slices.item() == 4


def test_backward_states_do_not_depend_on_padding_length():
    model = _model().eval()
    torch.manual_seed(2)
    x = torch.randn(1, 7, model.encoder.feature_dim)
    with torch.no_grad():
        alone_f, alone_b = model.encoder.directions(x, torch.tensor([7]))
        padded = torch.cat([x, 5 * torch.randn(1, 9, x.shape[-1])], dim=1)  # 9 frames of junk padding
        pad_f, pad_b = model.encoder.directions(padded, torch.tensor([7]))
    for a, b in zip(alone_b + alone_f, pad_b + pad_f):
        assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6)


def test_backward_state_at_t_reads_only_frames_from_t_on():
    model = _model().eval()
    torch.manual_seed(3)
    x = torch.randn(1, 10, model.encoder.feature_dim)
    changed = x.clone()
    changed[:, :4] = torch.randn(1, 4, x.shape[-1])
    lengths = torch.tensor([10])
    with torch.no_grad():
        _, b1 = model.encoder.directions(x, lengths)
        _, b2 = model.encoder.directions(changed, lengths)
    assert torch.allclose(b1[-1][:, 4:], b2[-1][:, 4:], atol=1e-6)
    assert not torch.allclose(b1[-1][:, :4], b2[-1][:, :4], atol=1e-3)


def test_padded_batch_equals_each_utterance_alone():
    model = _model().eval()
    batch = tiny_audio_batch()
    with torch.no_grad():
        out = model(batch)
    assert abs(out["loss"].item() - alone_average(model, batch, "slices")) < 1e-5


def test_loss_falls_when_overfitting_one_batch():
    model = _model()
    batch = tiny_audio_batch()
    losses = overfit(model, batch, steps=60, lr=1e-2)
    assert losses[-1] < 0.6 * losses[0]


def test_bad_settings_name_the_key():
    with pytest.raises(ConfigError, match=r"objective\.encoder\.dim must be an integer >= 1; got 0"):
        decoar(size="tiny", encoder={"dim": 0})
    with pytest.raises(ConfigError, match=r"objective\.dropout must be a number in \[0, 1\); got 2\.0"):
        decoar(size="tiny", dropout=2.0)
    with pytest.raises(ConfigError, match=r"objective\.encoder\.num_mel_bins"):
        decoar(size="tiny", encoder={"num_mel_bins": 0})
    with pytest.raises(ConfigError, match="model.size"):
        decoar(size="huge")


def test_recipe_pretrains_and_its_features_are_both_directions(synth_tiny, tmp_path):
    run = tmp_path / "decoar"
    assert (
        main(
            [
                "pretrain",
                "decoar",
                "model.size=tiny",
                f"data.train={synth_tiny / 'av' / 'train.jsonl'}",
                "train.max_steps=2",
                "train.log_every=1",
                f"train.out_dir={run}",
                "data.num_workers=0",
                "train.progress=false",
            ]
        )
        == 0
    )
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2] and all(0 < m["loss"] < 10 and m["slices"] > 0 for m in lines)
    feats = tmp_path / "feats"
    assert (
        main(
            [
                "extract",
                "--checkpoint",
                str(run),
                "--manifest",
                str(synth_tiny / "av" / "valid.jsonl"),
                "--layer",
                "2",
                "--out",
                str(feats),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert {(x["layer"], x["dim"]) for x in read_index(feats)} == {(2, 64)}
    assert all(torch.isfinite(v).all() for v in load_features(feats, 2).values())


def test_training_step_runs_on_the_meta_device():
    """A full step on meta tensors: the step needs no host sync (``mmssl.testing.meta_step``)."""
    with torch.device("meta"):
        model = _model().train()
    meta_step(model, tiny_audio_batch())
