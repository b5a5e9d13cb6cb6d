"""The denoising log-mel autoencoder (``denoising_autoencoder``, ``mmssl.objectives.vqvae``):
the noisy copy is mixed at the drawn SNR with the padding left silent, the loss is the clean
log mels' reconstruction from the noisy ones (checked by hand), it is the plain autoencoder's
when no utterance is noisy, and it learns."""

import json
import math

import pytest
import torch

from mmssl.cli import main
from mmssl.data.noise import AddNoise, WhiteNoise
from mmssl.errors import ConfigError, DataError
from mmssl.eval.extract import read_index
from mmssl.nn.reconstruction import log_mel
from mmssl.objectives.vqvae import NoisyCopy, autoencoder, denoising_autoencoder
from mmssl.testing import meta_step, overfit, tiny_audio_batch, utterances_alone


def _model(**kwargs):
    torch.manual_seed(0)
    return denoising_autoencoder(size="tiny", **kwargs)


def _rms(x):
    return float(x.double().square().mean().sqrt())


def test_the_noisy_copy_is_mixed_at_the_snr_and_the_clean_audio_and_padding_stay():
    batch = tiny_audio_batch((8000, 5600, 3200))
    clean = batch["audio"].clone()
    torch.manual_seed(3)
    out = NoisyCopy(AddNoise(WhiteNoise(), 1.0, (10.0, 10.0)))(batch)
    assert torch.equal(out["audio"], clean)  # the target is untouched
    for i, n in enumerate(batch["audio_lens"].tolist()):
        noise = out["noisy_audio"][i, :n] - clean[i, :n]
        assert 20 * math.log10(_rms(clean[i, :n]) / _rms(noise)) == pytest.approx(10.0, abs=1e-3)
        assert not out["noisy_audio"][i, n:].any()  # padding stays zero
    # a drawn SNR range: each utterance's SNR inside it; probability 0: no noise at all
    torch.manual_seed(4)
    ranged = NoisyCopy(AddNoise(WhiteNoise(), 1.0, (0.0, 20.0)))(dict(batch))["noisy_audio"]
    snrs = [
        20 * math.log10(_rms(clean[i, :n]) / _rms(ranged[i, :n] - clean[i, :n]))
        for i, n in enumerate(batch["audio_lens"].tolist())
    ]
    assert all(0.0 <= s <= 20.0 for s in snrs) and len({round(s, 3) for s in snrs}) == 3
    silent = NoisyCopy(AddNoise(WhiteNoise(), 0.0, (0.0, 20.0)))(dict(batch))["noisy_audio"]
    assert torch.equal(silent, clean)


def test_loss_reconstructs_the_clean_log_mels_from_the_noisy_ones_by_hand():
    model = _model(noise_snr=5.0).eval()
    batch = model.batch_hook()(tiny_audio_batch((8000, 5600, 3360)))
    lens = batch["audio_lens"]
    with torch.no_grad():
        out = model(batch)
        noisy, mel_lens = log_mel(batch["noisy_audio"], lens)  # (B, T_mel, 80), utterance CMVN
        clean, _ = log_mel(batch["audio"], lens)
        assert mel_lens.tolist() == [48, 33, 19]
        feats = model.encoder.extract(batch["noisy_audio"], lens)  # pairs of noisy mel frames
        recon = model.decoder(model.encoder.encode(feats.x, feats.lengths)[1], feats.lengths)
        total = sum(((recon[i, :n] - clean[i, :n]) ** 2).sum() for i, n in enumerate(mel_lens.tolist()))
        by_hand = total / (int(mel_lens.sum()) * 80)
        assert torch.allclose(feats.x[0, 3], torch.cat([noisy[0, 6], noisy[0, 7]]))
    assert out["loss"] == pytest.approx(float(by_hand), rel=1e-5)
    assert out["reconstruction_mse_loss"] == pytest.approx(float(by_hand), rel=1e-5)
    # the input really is the noisy copy: clean input reconstructs otherwise, to the same target
    with torch.no_grad():
        plain = model.reconstruct(batch["audio"], batch["audio"], lens)
    assert torch.equal(plain.target[0, :48], clean[0, :48])
    assert (plain.recon - recon).abs().max() > 1e-2


def test_with_no_noisy_utterance_it_is_the_plain_autoencoder():
    dae = _model(noise_prob=0.0).eval()
    torch.manual_seed(1)
    ae = autoencoder(size="tiny").eval()
    dae.load_state_dict(ae.state_dict())  # the same parts: the noise holds no weights
    batch = tiny_audio_batch()
    with torch.no_grad():
        assert torch.equal(dae(dict(batch))["loss"], ae(dict(batch))["loss"])


def test_forward_without_the_hook_makes_the_noisy_copy_itself():
    model = _model().eval()
    batch = tiny_audio_batch()
    torch.manual_seed(5)
    with torch.no_grad():
        out = model(dict(batch))
    torch.manual_seed(5)
    hooked = model.batch_hook()(dict(batch))
    with torch.no_grad():
        assert torch.equal(model(hooked)["loss"], out["loss"])


def test_padded_batch_equals_each_utterance_alone():
    model = _model().eval()
    batch = model.batch_hook()(tiny_audio_batch((8000, 5600, 3360)))
    with torch.no_grad():
        out = model(batch)
        total, count = 0.0, 0
        frames = model.encoder.frame_lengths(batch["audio_lens"])
        for i, alone in enumerate(utterances_alone(batch, frames)):
            n = int(batch["audio_lens"][i])
            alone["noisy_audio"] = batch["noisy_audio"][i : i + 1, :n]
            mels = int(model.encoder.frontend.log_mel.frame_spec(alone["audio_lens"])[0])
            total += model(alone)["reconstruction_mse_loss"].item() * mels
            count += mels
    assert out["reconstruction_mse_loss"].item() == pytest.approx(total / count, abs=1e-5)


def test_loss_falls_when_overfitting_one_batch():
    model = _model()
    batch = model.batch_hook()(tiny_audio_batch())
    losses = overfit(model, batch, steps=60, lr=5e-3, key="reconstruction_mse_loss")
    assert losses[-1] < 0.6 * losses[0]


def test_training_step_runs_on_the_meta_device():
    batch = _model().batch_hook()(tiny_audio_batch())
    with torch.device("meta"):
        model = _model().train()
    meta_step(model, batch)


def test_bad_settings_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"objective\.noise_prob must be in \[0, 1\]; got 2"):
        _model(noise_prob=2)
    with pytest.raises(ConfigError, match=r"objective\.noise_snr \[5, 1\] has low > high"):
        _model(noise_snr=[5, 1])
    with pytest.raises(ConfigError, match="noise_snr"):
        _model(noise_snr="loud")
    with pytest.raises(DataError, match="noise folder not found"):
        _model(noise_dir=str(tmp_path / "none"))
    with pytest.raises(ConfigError, match="model.size 'huge': denoising_autoencoder has sizes"):
        denoising_autoencoder(size="huge")


def test_recipe_pretrains_with_a_noise_folder_and_its_run_extracts(synth_tiny, tmp_path):
    run = tmp_path / "dae"
    args = [
        "pretrain",
        "denoising_autoencoder",
        "model.size=tiny",
        f"data.train={synth_tiny / 'av' / 'train.jsonl'}",
        f"objective.noise_dir={synth_tiny / 'noise' / 'train'}",
        "objective.noise_snr=[0,10]",
        "train.max_steps=2",
        "train.log_every=1",
        f"train.out_dir={run}",
        "data.num_workers=0",
        "train.progress=false",
    ]
    assert main(args) == 0
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2] and all(0 < m["reconstruction_mse_loss"] < 10 for m in lines)
    feats = tmp_path / "feats"
    extract = ["extract", "--checkpoint", str(run), "--manifest", str(synth_tiny / "av" / "valid.jsonl")]
    assert main([*extract, "--layer", "3", "--out", str(feats), "--device", "cpu"]) == 0
    assert {(x["layer"], x["dim"], x["frame_rate"]) for x in read_index(feats)} == {(3, 16, 50.0)}
