"""The audio stream of the audio-visual encoder (AV-HuBERT's input normalisation)."""

import math

import torch

from mmssl.encoders.av import av_tiny
from mmssl.nn.padding import lengths_to_padding_mask
from mmssl.testing import tiny_av_batch

LIP_MEAN, LIP_STD = 0.421, 0.165  # the loader's crop normalisation (AV-HuBERT)


def _rms(x, lengths):
    valid = ~lengths_to_padding_mask(lengths, x.shape[1])
    return x[valid].pow(2).mean().sqrt().item()


def test_audio_stream_reads_26_filterbanks_x4_layer_normed_per_frame():
    torch.manual_seed(0)
    enc = av_tiny().eval()
    assert enc.audio_frontend.out_dim == 104 and enc.audio_frontend.normalize  # audio_feat_dim: 104
    batch = tiny_av_batch()
    with torch.no_grad():
        _, raw, lengths = enc.audio_features(batch["audio"], batch["audio_lens"])
    full = raw[:, :-1][~lengths_to_padding_mask(lengths - 1, raw.shape[1] - 1)]  # every frame but the last
    torch.testing.assert_close(full.mean(-1), torch.zeros(len(full)), atol=1e-5, rtol=0)
    torch.testing.assert_close(full.var(-1, unbiased=False), torch.ones(len(full)), atol=1e-3, rtol=0)


def test_audio_features_ignore_the_recording_gain():
    torch.manual_seed(0)
    enc = av_tiny().eval()
    batch = tiny_av_batch()
    with torch.no_grad():
        a, raw, lengths = enc.audio_features(batch["audio"], batch["audio_lens"])
        a_quiet, raw_quiet, _ = enc.audio_features(0.1 * batch["audio"], batch["audio_lens"])
    valid = ~lengths_to_padding_mask(lengths, raw.shape[1])
    assert (raw - raw_quiet)[valid].abs().max() < 1e-3
    assert (a - a_quiet)[valid].abs().max() < 1e-3


def test_fused_input_halves_have_comparable_scale_at_init():
    """At the fusion's LayerNorm the audio half no longer outweighs the lip half: over a few
    initialisations the RMS ratio is near 1 (raw filterbanks gave about 2.3 on average, and
    an audio RMS near 1.6)."""
    log_ratios = []
    for seed in range(8):
        torch.manual_seed(seed)
        enc = av_tiny().eval()
        batch = tiny_av_batch(seed=seed)
        video = (batch["video"] - LIP_MEAN) / LIP_STD
        with torch.no_grad():
            a, _, a_lens = enc.audio_features(batch["audio"], batch["audio_lens"])
            v, v_lens = enc.video_features(video, batch["video_lens"])
        assert _rms(a, a_lens) < 1.0
        log_ratios.append(math.log(_rms(a, a_lens) / _rms(v, v_lens)))
    assert 0.5 < math.exp(sum(log_ratios) / len(log_ratios)) < 2.0
