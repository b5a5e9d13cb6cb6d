import math

import pytest
import torch
import torchaudio.compliance.kaldi as kaldi

from mmssl.encoders.base import FrameSpec
from mmssl.nn.fbank import fbank, fbank_batch, logfbank_psf_batch, mfcc, num_frames, stack_frames


def _wave(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n) / 16000
    return 0.3 * torch.sin(2 * torch.pi * 220 * t) + 0.01 * torch.randn(n, generator=g)


@pytest.mark.parametrize("n", [400, 559, 560, 16000, 16399])
def test_fbank_frame_count_matches_formula_and_framespec(n):
    out = fbank(_wave(n))
    assert out.shape == (1 + (n - 400) // 160, 80)
    assert out.shape[0] == num_frames(n) == int(FrameSpec((400,), (160,))(torch.tensor(n)))


def test_framespec_window_is_the_samples_one_frame_reads():
    # a filterbank frame reads 400 samples; four stacked ones 400 + 3 hops of 160
    assert FrameSpec((400,), (160,)).window == 400
    assert FrameSpec((400,), (160,), stack=4).window == 880
    # wav2vec 2.0's conv stack: 400 samples (25 ms) at a 320-sample hop (fairseq's receptive field)
    spec = FrameSpec((10, 3, 3, 3, 3, 2, 2), (5, 2, 2, 2, 2, 2, 2))
    assert spec.window == 400
    # every second filterbank frame kept (DeCoAR 2.0's input): still one 400-sample window each
    assert FrameSpec((400, 1), (160, 2)).window == 400
    # the window is the shortest input that gives a frame
    assert int(spec(torch.tensor(400))) == 1 and int(spec(torch.tensor(399))) == 0


@pytest.mark.parametrize("n", [0, 1, 399])
def test_too_short_gives_empty(n):
    assert fbank(_wave(n)).shape == (0, 80)
    assert mfcc(_wave(n)).shape == (0, 39)
    assert mfcc(_wave(n), deltas=False).shape == (0, 13)


def test_fbank_matches_torchaudio_kaldi():
    w = _wave(8000)
    ref = kaldi.fbank(w[None], num_mel_bins=80, dither=0.0, frame_length=25, frame_shift=10)
    torch.testing.assert_close(fbank(w), ref)

    # a 220 Hz tone peaks in the bin whose centre is nearest on the mel scale
    # (80 triangles evenly spaced in mel between 20 Hz and 8 kHz)
    def mel(f):
        return 1127 * math.log(1 + f / 700)

    step = (mel(8000) - mel(20)) / 81
    expected = round((mel(220) - mel(20)) / step) - 1
    assert int(fbank(w).mean(0).argmax()) == expected


def test_mfcc_deltas_layout():
    w = _wave(8000)
    out = mfcc(w)
    assert out.shape == (num_frames(8000), 39)
    ceps = kaldi.mfcc(w[None], dither=0.0, use_energy=False)
    torch.testing.assert_close(out[:, :13], ceps)
    # delta at an interior frame, by the regression formula over +-2 frames
    t = 10
    hand = sum(n * (ceps[t + n] - ceps[t - n]) for n in (1, 2)) / (2 * (1 + 4))
    torch.testing.assert_close(out[t, 13:26], hand)
    d1 = out[:, 13:26]
    hand2 = sum(n * (d1[t + n] - d1[t - n]) for n in (1, 2)) / 10
    torch.testing.assert_close(out[t, 26:], hand2)


def test_stack_frames_layout_and_padding():
    x = torch.arange(7 * 3, dtype=torch.float32).reshape(7, 3)  # (T=7, C=3)
    out = stack_frames(x, 4)
    assert out.shape == (2, 12)
    torch.testing.assert_close(out[0], x[0:4].reshape(-1))
    torch.testing.assert_close(out[1, :9], x[4:7].reshape(-1))
    assert (out[1, 9:] == 0).all()


def test_stack_frames_batched_and_exact_multiple():
    x = torch.randn(2, 5, 8, 6)  # (..., T, C)
    out = stack_frames(x, 4)
    assert out.shape == (2, 5, 2, 24)
    torch.testing.assert_close(out[1, 3, 1], x[1, 3, 4:8].reshape(-1))
    assert stack_frames(torch.zeros(0, 6), 4).shape == (0, 24)
    torch.testing.assert_close(stack_frames(x, 1), x)


def test_fbank_batch_equals_each_utterance_alone():
    lengths = torch.tensor([9000, 16000, 560, 399, 0])
    audio = torch.zeros(5, 16000)
    for i, n in enumerate(lengths.tolist()):
        audio[i, :n] = _wave(n, seed=i)
    audio[1, 4000:6000] = 0  # digital silence inside: the log floor
    feats, frame_lens = fbank_batch(audio, lengths)
    assert frame_lens.tolist() == [num_frames(n) for n in lengths.tolist()]
    assert feats.shape == (5, num_frames(16000), 80)
    for i, n in enumerate(lengths.tolist()):
        alone = fbank(audio[i, :n])
        t = alone.shape[0]
        torch.testing.assert_close(feats[i, :t], alone, atol=1e-4, rtol=1e-5)
        assert (feats[i, t:] == 0).all()
    assert fbank_batch(torch.zeros(2, 300), torch.tensor([300, 10]))[0].shape == (2, 0, 80)


@pytest.mark.cuda
def test_fbank_batch_on_cuda_matches_cpu():
    lengths = torch.tensor([16000, 7000])
    audio = torch.stack([_wave(16000, 0), _wave(16000, 1)])
    cpu, _ = fbank_batch(audio, lengths)
    gpu, frame_lens = fbank_batch(audio.cuda(), lengths.cuda())
    assert frame_lens.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-3, rtol=1e-4)


def test_logfbank_psf_batch_matches_python_speech_features():
    """AV-HuBERT's features: python_speech_features.logfbank of int16-scale samples, each
    utterance alone, on the frames of whole windows; exact silence at the log floor."""
    psf = pytest.importorskip("python_speech_features")
    lengths = torch.tensor([16000, 9001, 560, 400, 399])
    audio = torch.zeros(5, 16000, dtype=torch.float64)
    for i, n in enumerate(lengths.tolist()):
        audio[i, :n] = (_wave(n, seed=i) * 32768).round().double()
    audio[0, 4000:6000] = 0  # digital silence inside: energies of exactly 0
    feats, frame_lens = logfbank_psf_batch(audio.float(), lengths)
    assert frame_lens.tolist() == [num_frames(n) for n in lengths.tolist()]
    assert feats.shape == (5, num_frames(16000), 26)
    for i, n in enumerate(lengths.tolist()):
        t = num_frames(n)
        if t:
            ref = torch.from_numpy(psf.logfbank(audio[i, :n].numpy(), samplerate=16000)).float()
            assert ref.shape[0] in (t, t + 1)  # logfbank adds a padded partial frame
            torch.testing.assert_close(feats[i, :t], ref[:t], atol=2e-4, rtol=1e-5)
        assert (feats[i, t:] == 0).all()
    silent = feats[0, 26:36]  # frames wholly inside the silence: float64's eps, logged
    assert torch.allclose(silent, torch.full_like(silent, math.log(2.220446049250313e-16)))
