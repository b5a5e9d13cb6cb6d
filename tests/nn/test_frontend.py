import pytest
import torch
from torch import nn

from mmssl.errors import ConfigError, DataError
from mmssl.nn.fbank import fbank, stack_frames
from mmssl.nn.frontend import FbankFrontend, MaskedGroupNorm, build_conv_frontend
from mmssl.testing import tiny_audio_batch


def test_frame_spec_matches_conv_output_for_many_lengths():
    frontend = build_conv_frontend(channels=4).eval()
    for n in [400, 401, 719, 720, 721, 1039, 1040, 3333, 8000]:
        with torch.no_grad():
            x, lens = frontend(torch.randn(1, n), torch.tensor([n]))
        assert x.shape[1] == lens.item() == frontend.frame_spec(torch.tensor([n])).item(), n
    # closed form of the 400-sample window / 320-sample hop (wav2vec 2.0)
    samples = torch.arange(0, 20000, 37)
    expected = ((samples - 400).div(320, rounding_mode="floor") + 1).clamp(min=0)
    assert torch.equal(frontend.frame_spec(samples), expected)
    assert frontend.receptive_field == 400 and frontend.hop == 320 and frontend.frame_rate == 50.0


def test_masked_group_norm_equals_group_norm_without_padding():
    torch.manual_seed(0)
    norm = MaskedGroupNorm(6)
    ref = nn.GroupNorm(6, 6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
        ref.load_state_dict(norm.state_dict())
    x = torch.randn(2, 6, 17)
    assert torch.allclose(norm(x, torch.tensor([17, 17])), ref(x), atol=1e-5)
    # with padding, statistics cover only valid frames: the prefix alone gives the same values
    out = norm(x, torch.tensor([17, 9]))
    assert torch.allclose(out[1, :, :9], ref(x[1:, :, :9])[0], atol=1e-5)


@pytest.mark.parametrize("norm", ["group", "layer"])
def test_conv_frontend_batch_consistency(norm):
    torch.manual_seed(0)
    frontend = build_conv_frontend(channels=8, norm=norm).eval()
    batch = tiny_audio_batch()
    with torch.no_grad():
        x, lens = frontend(batch["audio"], batch["audio_lens"])
        for i, n in enumerate(batch["audio_lens"].tolist()):
            alone, alone_len = frontend(batch["audio"][i : i + 1, :n], torch.tensor([n]))
            assert lens[i] == alone_len[0]
            assert torch.allclose(x[i, : lens[i]], alone[0], atol=1e-5)


def test_conv_frontend_rejects_a_batch_shorter_than_one_window():
    frontend = build_conv_frontend(channels=4)
    with pytest.raises(DataError, match="400"):
        frontend(torch.zeros(2, 399), torch.tensor([399, 100]))


def test_fbank_frontend_is_stacked_kaldi_fbank_per_utterance():
    frontend = FbankFrontend(num_mel_bins=80, stack=4)
    assert frontend.frame_rate == 25.0 and frontend.out_dim == 320
    batch = tiny_audio_batch(lengths=(4000, 2321, 640))
    x, lens = frontend(batch["audio"], batch["audio_lens"])
    for i, n in enumerate(batch["audio_lens"].tolist()):
        expected = stack_frames(fbank(batch["audio"][i, :n]), 4)
        assert lens[i].item() == expected.shape[0]
        torch.testing.assert_close(x[i, : lens[i]], expected, atol=1e-5, rtol=1e-5)  # float32 rounding
    # frames: 1 + (S - 400) // 160 at 100 Hz, then ceil(/ 4)
    assert lens.tolist() == [-(-(1 + (n - 400) // 160) // 4) for n in (4000, 2321, 640)]
    assert not x[2, lens[2] :].any()  # padding frames stay zero


def test_fbank_frontend_normalize_layer_norms_each_stacked_frame_over_its_real_frames():
    plain, normed = (
        FbankFrontend(num_mel_bins=26, stack=4),
        FbankFrontend(num_mel_bins=26, stack=4, normalize=True),
    )
    batch = tiny_audio_batch(lengths=(4000, 2321, 640))  # 23, 13 and 2 filterbank frames
    x, lens = plain(batch["audio"], batch["audio_lens"])
    y, y_lens = normed(batch["audio"], batch["audio_lens"])
    assert torch.equal(lens, y_lens)
    for i, n in enumerate((23, 13, 2)):
        for t in range(int(lens[i])):
            real = min(4, n - 4 * t) * 26  # every last frame holds zero padding here
            frame = x[i, t, :real]
            expected = (frame - frame.mean()) / torch.sqrt(frame.var(unbiased=False) + 1e-5)
            torch.testing.assert_close(y[i, t, :real], expected, atol=1e-4, rtol=1e-4)
            assert not y[i, t, real:].any()  # padding filterbank frames -> 0, the frame's mean
        assert not y[i, lens[i] :].any()  # padded frames stay zero
    quiet, _ = normed(0.01 * batch["audio"], batch["audio_lens"])  # a gain changes nothing
    torch.testing.assert_close(quiet, y, atol=1e-3, rtol=0)


def test_fbank_frontend_reads_no_value_on_the_host():
    """On the meta device any ``.item()``, ``.tolist()`` or data-dependent shape raises: the
    frontend computes a padded batch from shapes alone, as a CUDA step needs (no sync)."""
    frontend = FbankFrontend(num_mel_bins=40, stack=4)
    audio, lens = torch.zeros(3, 4000, device="meta"), torch.zeros(3, dtype=torch.long, device="meta")
    x, frame_lens = frontend(audio, lens)
    assert x.shape == (3, 6, 160) and frame_lens.shape == (3,)


@pytest.mark.parametrize("stack", [1, 3])
def test_fbank_frontend_padding_values_and_neighbours_change_nothing(stack):
    frontend = FbankFrontend(num_mel_bins=80, stack=stack)
    batch = tiny_audio_batch(lengths=(3000, 1999, 0, 405))
    noisy = batch["audio"].clone()
    g = torch.Generator().manual_seed(0)
    for i, n in enumerate(batch["audio_lens"].tolist()):
        noisy[i, n:] = torch.randn(noisy.shape[1] - n, generator=g)  # garbage in the padding
    x, lens = frontend(noisy, batch["audio_lens"])
    assert lens.tolist() == [-(-max(0, 1 + (n - 400) // 160) // stack) for n in (3000, 1999, 0, 405)]
    for i, n in enumerate(batch["audio_lens"].tolist()):
        alone, alone_lens = (
            frontend(noisy[i : i + 1, :n], batch["audio_lens"][i : i + 1])
            if n >= 400
            else (torch.zeros(1, 0, 80 * stack), torch.zeros(1, dtype=torch.long))
        )
        t = int(lens[i])
        assert t == int(alone_lens[0])
        assert torch.allclose(x[i, :t], alone[0], atol=1e-5)
        assert not x[i, t:].any()  # padded frames are zero


@pytest.mark.cuda
def test_fbank_frontend_on_cuda_never_syncs_and_matches_cpu():
    frontend = FbankFrontend()
    batch = tiny_audio_batch(lengths=(4000, 2321, 640))
    ref, ref_lens = frontend(batch["audio"], batch["audio_lens"])
    audio, lens = batch["audio"].cuda(), batch["audio_lens"].cuda()
    frontend(audio, lens)  # first call builds the cached window and mel banks
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        x, frame_lens = frontend(audio, lens)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(frame_lens.cpu(), ref_lens)
    assert torch.allclose(x.cpu(), ref, atol=1e-3, rtol=1e-4)


def test_fbank_frontend_psf_is_av_hubert_loaders_features():
    """kind="psf": what AV-HuBERT's loader feeds its model: logfbank of the int16 samples,
    stacked by 4 with zero frames, F.layer_norm over each stacked frame (padding included)."""
    psf = pytest.importorskip("python_speech_features")
    frontend = FbankFrontend(num_mel_bins=26, stack=4, normalize=True, kind="psf")
    batch = tiny_audio_batch(lengths=(4000, 2321, 640))  # 23, 13 and 2 whole frames
    x, lens = frontend(batch["audio"], batch["audio_lens"])
    assert lens.tolist() == [6, 4, 1]
    for i, n in enumerate(batch["audio_lens"].tolist()):
        samples = (batch["audio"][i, :n].double() * 32768).numpy()
        frames = torch.from_numpy(psf.logfbank(samples, samplerate=16000)).float()
        frames = frames[: 1 + (n - 400) // 160]  # whole windows only
        expected = torch.nn.functional.layer_norm(stack_frames(frames, 4), (104,))
        torch.testing.assert_close(x[i, : lens[i]], expected, atol=2e-4, rtol=1e-4)
        assert not x[i, lens[i] :].any()
    with pytest.raises(ConfigError, match="audio features must be one of"):
        FbankFrontend(kind="librosa")
