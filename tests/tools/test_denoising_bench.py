"""``tools/bench/denoising.py``: its error is the objective's own reconstruction loss (clean
input, one record at a time, weighted by mel frames), and noisy copies are mixed at the SNR."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from mmssl.data.noise import NoiseBank
from mmssl.objectives.vqvae import autoencoder
from mmssl.testing import tiny_audio_batch

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("bench_denoising", ROOT / "tools" / "bench" / "denoising.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_error_is_the_frame_weighted_reconstruction_loss_and_copies_are_at_the_snr(synth_tiny):
    torch.manual_seed(0)
    model = autoencoder(size="tiny").eval()
    batch = tiny_audio_batch((8000, 5600, 3360))
    waves = [batch["audio"][i, :n] for i, n in enumerate(batch["audio_lens"].tolist())]
    with torch.no_grad():
        padded = float(model(batch)["loss"])  # the mean over every real mel frame of the batch
    assert bench.error(model, waves, waves) == pytest.approx(padded, rel=1e-5)
    bank = NoiseBank(synth_tiny / "noise" / "test")
    noisy = bench.noisy_copies(waves, ["a", "b", "c"], bank, "5", seed=0)
    again = bench.noisy_copies(waves, ["a", "b", "c"], bank, "5", seed=0)
    for clean, mixed, same in zip(waves, noisy, again):
        noise = mixed - clean
        snr = 20 * math.log10(float(clean.square().mean().sqrt()) / float(noise.square().mean().sqrt()))
        assert snr == pytest.approx(5.0, abs=1e-3) and torch.equal(mixed, same)
    assert bench.noisy_copies(waves, ["a", "b", "c"], bank, "clean", seed=0) is waves
