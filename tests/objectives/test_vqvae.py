import json

import pytest
import torch

from mmssl.cli import main
from mmssl.errors import ConfigError
from mmssl.eval.extract import load_features, read_index
from mmssl.nn.reconstruction import log_mel
from mmssl.objectives.vqvae import autoencoder, vqvae
from mmssl.runs import load_encoder_from_run
from mmssl.testing import meta_step, overfit, tiny_audio_batch, utterances_alone


def _model(**kwargs):
    torch.manual_seed(0)
    return vqvae(size="tiny", entries=32, **kwargs)


def test_downsampled_latents_and_reconstruction_cover_every_mel_frame():
    model = _model().eval()
    batch = tiny_audio_batch((8000, 5600, 3360))  # 48, 33 and 19 mel frames
    mel, mel_lens = log_mel(batch["audio"], batch["audio_lens"])
    feats = model.encoder.extract(batch["audio"], batch["audio_lens"])
    assert mel_lens.tolist() == [48, 33, 19] and feats.lengths.tolist() == [24, 17, 10]
    assert torch.equal(feats.lengths, model.encoder.frame_lengths(batch["audio_lens"]))
    # frame t of the encoder input holds mel frames 2t and 2t + 1
    assert torch.equal(feats.x[1, 16], torch.cat([mel[1, 32], torch.zeros(80)]))
    assert torch.equal(feats.x[0, 5], torch.cat([mel[0, 10], mel[0, 11]]))
    with torch.no_grad():
        recon = model.decoder(model.encoder.encode(feats.x, feats.lengths)[1], feats.lengths)
    assert recon.shape == (3, 48, 80)


def test_padded_batch_equals_each_utterance_alone():
    model = _model().eval()
    batch = tiny_audio_batch((8000, 5600, 3360))
    with torch.no_grad():
        feats = model.encoder.extract(batch["audio"], batch["audio_lens"])
        layers = model.encoder.contextualize(feats.x, feats.lengths).layers
        out = model(batch)
        total, count = 0.0, 0
        for i, alone in enumerate(utterances_alone(batch, model.encoder.frame_lengths(batch["audio_lens"]))):
            f = model.encoder.extract(alone["audio"], alone["audio_lens"])
            n = int(f.lengths[0])
            for a, b in zip(model.encoder.contextualize(f.x, f.lengths).layers, layers):
                assert torch.allclose(a[0], b[i, :n], atol=1e-5)
            mels = int(model.encoder.frontend.log_mel.frame_spec(alone["audio_lens"])[0])
            total += model(alone)["reconstruction_mse_loss"].item() * mels
            count += mels
    assert abs(out["reconstruction_mse_loss"].item() - total / count) < 1e-5


@pytest.mark.parametrize("ema", [True, False])
def test_loss_is_reconstruction_plus_the_vq_terms(ema):
    model = _model(ema_decay=0.99 if ema else None, restart_threshold=0.0).eval()
    out = model(tiny_audio_batch())
    vq = out["commitment_loss"] * 0.25 + (0.0 if ema else out["codebook_loss"])
    assert torch.isclose(out["loss"], out["reconstruction_mse_loss"] + vq)
    assert 1.0 <= out["code_perplexity"] <= 32 and 0 < out["code_usage"] <= 1


def test_quantised_layer_holds_codebook_entries():
    model = _model().eval()
    batch = tiny_audio_batch()
    feats = model.encoder.extract(batch["audio"], batch["audio_lens"])
    with torch.no_grad():
        out = model.encoder.contextualize(feats.x, feats.lengths)
    z_q = out.hidden[0, : feats.lengths[0]]  # (T, D)
    book = model.encoder.quantizer.codebook
    z_e = out.layers[-2][0, : feats.lengths[0]]  # the layer before: the continuous latents
    nearest = torch.cdist(z_e, book, compute_mode="donot_use_mm_for_euclid_dist").argmin(1)
    assert torch.allclose(z_q, book[nearest], atol=1e-6)
    assert not torch.allclose(z_q, z_e)


@pytest.mark.parametrize("name", ["vqvae", "autoencoder"])
def test_loss_falls_when_overfitting_one_batch(name):
    torch.manual_seed(0)
    model = vqvae(size="tiny", entries=32) if name == "vqvae" else autoencoder(size="tiny")
    batch = tiny_audio_batch()
    losses = overfit(model, batch, steps=60, lr=5e-3, key="reconstruction_mse_loss")
    assert losses[-1] < 0.6 * losses[0]
    if name == "vqvae":  # restarts keep most of the 32 entries in use
        assert model(batch)["code_usage"] > 0.5


def test_bad_settings_name_the_key():
    with pytest.raises(ConfigError, match="reconstruction"):
        autoencoder(size="tiny", reconstruction="huber")
    with pytest.raises(ConfigError, match="width"):
        autoencoder(size="tiny", encoder={"width": 3})
    with pytest.raises(ConfigError, match=r"objective\.beta must be a number >= 0; got -1"):
        vqvae(size="tiny", beta=-1)
    with pytest.raises(ConfigError, match=r"objective\.restart_threshold must be a number >= 0; got -2"):
        vqvae(size="tiny", restart_threshold=-2)
    with pytest.raises(ConfigError, match=r"objective\.encoder\.latent_dim must be an integer >= 1; got 0"):
        vqvae(size="tiny", encoder={"latent_dim": 0})
    with pytest.raises(ConfigError, match=r"autoencoder: objective\.encoder\.channels"):
        autoencoder(size="tiny", encoder={"channels": 0})
    with pytest.raises(ConfigError, match="model.size 'huge': vqvae has sizes"):
        vqvae(size="huge")


@pytest.mark.parametrize("recipe", ["vqvae", "autoencoder"])
def test_recipe_pretrains_and_its_run_extracts(recipe, synth_tiny, tmp_path):
    run = tmp_path / recipe
    assert (
        main(
            [
                "pretrain",
                recipe,
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
    assert [m["step"] for m in lines] == [1, 2] and all(0 < m["reconstruction_mse_loss"] < 10 for m in lines)
    if recipe == "vqvae":
        assert all(1.0 <= m["code_perplexity"] <= 512 and 0 < m["code_usage"] <= 1 for m in lines)
    encoder = load_encoder_from_run(run)
    top = encoder.num_layers
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
                str(top),
                "--out",
                str(feats),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert {(x["layer"], x["dim"], x["frame_rate"]) for x in read_index(feats)} == {(top, 16, 50.0)}
    stored = torch.cat(list(load_features(feats, top).values()))
    if recipe == "vqvae":  # the last layer is z_q: every frame is an entry of the trained codebook
        gaps = torch.cdist(stored, encoder.quantizer.codebook, compute_mode="donot_use_mm_for_euclid_dist")
        assert gaps.min(1).values.max() < 1e-4
    else:
        assert torch.isfinite(stored).all() and stored.std() > 0


def test_contextualize_never_moves_the_codebook():
    model = _model().train()
    batch = tiny_audio_batch()
    before = {k: v.clone() for k, v in model.encoder.quantizer.state_dict().items()}
    feats = model.encoder.extract(batch["audio"], batch["audio_lens"])
    model.encoder.contextualize(feats.x, feats.lengths)
    assert all(torch.equal(before[k], v) for k, v in model.encoder.quantizer.state_dict().items())
    model(batch)  # the objective's training step does move it
    assert not torch.equal(before["codebook"], model.encoder.quantizer.codebook)


@pytest.mark.parametrize("name", ["vqvae", "autoencoder"])
def test_training_step_runs_on_the_meta_device(name):
    """Meta tensors hold no data: ``.item()``, ``bool(tensor)`` and boolean-mask indexing raise
    there, so a full step on them (EMA update and restarts included) shows the step needs no
    host sync (checked without a GPU)."""
    with torch.device("meta"):
        torch.manual_seed(0)
        model = (vqvae(size="tiny", entries=32) if name == "vqvae" else autoencoder(size="tiny")).train()
    meta_step(model, tiny_audio_batch())
