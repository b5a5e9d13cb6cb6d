import json

import pytest
import torch

from mmssl.cli import main
from mmssl.errors import ConfigError
from mmssl.eval.extract import load_features, read_index
from mmssl.objectives.apc import apc
from mmssl.testing import alone_average, meta_step, overfit, tiny_audio_batch


def _model(time_shift: int = 3):
    torch.manual_seed(0)
    return apc(size="tiny", time_shift=time_shift)


def test_prediction_at_t_is_compared_with_frame_t_plus_n():
    model = _model(time_shift=3).eval()
    batch = tiny_audio_batch()
    with torch.no_grad():
        out = model(batch)
        feats = model.encoder.extract(batch["audio"], batch["audio_lens"])
        pred = model.head(model.encoder.contextualize(feats.x, feats.lengths).hidden)
    total, count = 0.0, 0
    for b, n in enumerate(feats.lengths.tolist()):
        for t in range(n - 3):  # the last 3 valid frames have no target
            total += (pred[b, t] - feats.x[b, t + 3]).abs().sum().item()
            count += feats.x.shape[-1]
    assert count > 0
    assert abs(out["loss"].item() - total / count) < 1e-5
    assert out["predicted_frames"].item() == sum(n - 3 for n in feats.lengths.tolist())


def test_padded_batch_equals_each_utterance_alone():
    model = _model().eval()
    batch = tiny_audio_batch()
    with torch.no_grad():
        out = model(batch)
    assert abs(out["loss"].item() - alone_average(model, batch, "predicted_frames")) < 1e-5


def test_representation_at_t_ignores_later_frames():
    model = _model().eval()
    batch = tiny_audio_batch((4000, 4000))
    with torch.no_grad():
        feats = model.encoder.extract(batch["audio"], batch["audio_lens"])
        changed = feats.x.clone()
        changed[:, 11:] = torch.randn_like(changed[:, 11:])
        a = model.encoder.contextualize(feats.x, feats.lengths).layers
        b = model.encoder.contextualize(changed, feats.lengths).layers
    assert len(a) == model.encoder.num_layers == 2
    for x, y in zip(a, b):
        assert torch.allclose(x[:, :11], y[:, :11], atol=1e-6)
        assert not torch.allclose(x[:, 11:], y[:, 11:], atol=1e-3)


def test_states_up_to_t_ignore_audio_after_frame_t_s_window():
    """End to end from the waveform: louder and noisier audio after the window of frame 40
    (samples 6400..6799) leaves every layer's states at frames <= 40 as they were."""
    model = _model().eval()
    batch = tiny_audio_batch((12000, 12000))
    changed = dict(batch, audio=batch["audio"].clone())
    end = 40 * 160 + 400  # the first sample that frame 40 does not read
    changed["audio"][:, end:] = 4 * changed["audio"][:, end:] + 0.2 * torch.randn(2, 12000 - end)
    with torch.no_grad():
        a = model.encoder(batch["audio"], batch["audio_lens"]).layers
        b = model.encoder(changed["audio"], changed["audio_lens"]).layers
        fa = model.encoder.extract(batch["audio"], batch["audio_lens"]).x
        fb = model.encoder.extract(changed["audio"], changed["audio_lens"]).x
    assert torch.allclose(fa[:, :41], fb[:, :41], atol=1e-5)
    for x, y in zip(a, b):
        assert torch.allclose(x[:, :41], y[:, :41], atol=1e-5)
        assert not torch.allclose(x[:, 45:], y[:, 45:], atol=1e-2)


def test_loss_falls_when_overfitting_one_batch():
    model = _model()
    batch = tiny_audio_batch()
    losses = overfit(model, batch, steps=60, lr=1e-2)
    assert losses[-1] < 0.6 * losses[0]


def test_bad_settings_name_the_key():
    with pytest.raises(ConfigError, match="time_shift"):
        apc(size="tiny", time_shift=0)
    with pytest.raises(ConfigError, match="model.size"):
        apc(size="huge")
    with pytest.raises(ConfigError, match=r"objective\.encoder\.dim must be an integer >= 1; got 0"):
        apc(size="tiny", encoder={"dim": 0})
    with pytest.raises(ConfigError, match=r"objective\.dropout must be a number in \[0, 1\); got 2\.0"):
        apc(size="tiny", dropout=2.0)
    with pytest.raises(ConfigError, match=r"objective\.encoder\.num_layers"):
        apc(size="tiny", encoder={"num_layers": 0})
    with pytest.raises(ConfigError, match=r"objective\.encoder\.dropout"):
        apc(size="tiny", encoder={"dropout": -0.5})


def test_recipe_names_a_bad_width_or_dropout(synth_tiny, tmp_path, capsys):
    common = [
        "model.size=tiny",
        f"data.train={synth_tiny / 'av' / 'train.jsonl'}",
        f"train.out_dir={tmp_path / 'r'}",
    ]
    assert main(["pretrain", "apc", *common, "objective.encoder.dim=0"]) != 0
    assert "objective.encoder.dim must be an integer >= 1; got 0" in capsys.readouterr().err
    assert main(["pretrain", "apc", *common, "objective.dropout=2.0"]) != 0
    assert "objective.dropout must be a number in [0, 1); got 2.0" in capsys.readouterr().err


def test_recipe_pretrains_and_its_run_extracts_every_layer(synth_tiny, tmp_path):
    run = tmp_path / "apc"
    assert (
        main(
            [
                "pretrain",
                "apc",
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
    assert [m["step"] for m in lines] == [1, 2]
    assert all(0 < m["loss"] < 10 and m["l1_loss"] == m["loss"] for m in lines)
    feats = tmp_path / "feats"
    manifest = synth_tiny / "av" / "valid.jsonl"
    assert (
        main(
            [
                "extract",
                "--checkpoint",
                str(run),
                "--manifest",
                str(manifest),
                "--layer",
                "all",
                "--out",
                str(feats),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    index = read_index(feats)
    assert {(x["layer"], x["dim"], x["frame_rate"]) for x in index} == {
        (0, 80, 100.0),
        (1, 32, 100.0),
        (2, 32, 100.0),
    }
    stored = load_features(feats, 2)
    assert len(stored) == 4 and all(torch.isfinite(v).all() for v in stored.values())


def test_training_step_runs_on_the_meta_device():
    """A full step on meta tensors: the step needs no host sync (``mmssl.testing.meta_step``)."""
    with torch.device("meta"):
        model = _model().train()
    meta_step(model, tiny_audio_batch())
