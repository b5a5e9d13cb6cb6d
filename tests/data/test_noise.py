import math
import pickle

import numpy as np
import pytest
import torch

from mmssl.data.noise import AddNoise, NoiseBank, fit_length, mix_at_snr, snr_range
from mmssl.errors import ConfigError
from tests.data.media import tone, write_wav


def _snr(clean, mixed):
    noise = mixed - clean
    return 20 * math.log10(clean.pow(2).mean().sqrt() / noise.pow(2).mean().sqrt())


@pytest.mark.parametrize("snr", [-5.0, 0.0, 7.5, 20.0])
def test_achieved_snr(snr):
    g = torch.Generator().manual_seed(0)
    clean = 0.3 * torch.sin(torch.arange(16000) * 0.05)
    noise = torch.randn(5000, generator=g)  # shorter: looped
    out = mix_at_snr(clean, noise, snr, generator=g)
    assert abs(_snr(clean, out) - snr) < 0.1


def test_fit_length_loops_and_crops_from_offset():
    noise = torch.arange(5.0)
    out = fit_length(noise, 12, torch.Generator().manual_seed(1))
    start = int(out[0])
    assert out.tolist() == [float((start + i) % 5) for i in range(12)]
    assert fit_length(torch.arange(100.0), 7).shape == (7,)


def test_batched_with_lengths_and_per_row_snr():
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(3, 4000, generator=g)
    lengths = torch.tensor([4000, 2500, 1000])
    clean[1, 2500:] = 0
    clean[2, 1000:] = 0
    snr = torch.tensor([0.0, 10.0, 5.0])
    out = mix_at_snr(clean, torch.randn(3, 6000, generator=g), snr, generator=g, lengths=lengths)
    for i, n in enumerate(lengths.tolist()):
        assert (out[i, n:] == 0).all()  # padding stays silent
        assert abs(_snr(clean[i, :n], out[i, :n]) - float(snr[i])) < 0.1  # measured on valid samples


def test_silent_inputs_give_no_nan():
    clean = torch.zeros(800)
    out = mix_at_snr(clean, torch.randn(800), 10.0)
    assert torch.equal(out, clean)
    speech = torch.randn(800)
    assert torch.equal(mix_at_snr(speech, torch.zeros(300), 0.0), speech)


def test_noise_bank_and_add_noise(tmp_path):
    (tmp_path / "sub").mkdir()
    write_wav(tmp_path / "a.wav", tone(4000, freq=300))
    write_wav(tmp_path / "sub" / "b.wav", tone(3000, 8000, freq=500), 8000)
    (tmp_path / "notes.txt").write_text("not audio")
    bank = NoiseBank(tmp_path)
    assert [p.rsplit("/", 1)[-1] for p in bank.files] == ["a.wav", "b.wav"]
    assert bank.load(1).shape == (6000,)  # resampled to 16 kHz
    g = torch.Generator().manual_seed(0)
    assert bank.sample(10000, g).shape == (10000,)
    clean = 0.1 * torch.randn(8000, generator=g)
    assert torch.equal(AddNoise(bank, prob=0.0)(clean, g), clean)
    for _ in range(5):
        snr = _snr(clean, AddNoise(bank, prob=1.0, snr_range=(5.0, 15.0))(clean, g))
        assert 4.9 < snr < 15.1


def test_noise_bank_keeps_decoded_files_within_its_byte_budget(tmp_path, monkeypatch):
    import mmssl.data.noise as noise_module

    for i in range(12):
        write_wav(tmp_path / f"n{i:02d}.wav", tone(1600, freq=200 + 50 * i))  # 6,400 bytes decoded
    decoded = []
    real = noise_module.load_audio
    monkeypatch.setattr(noise_module, "load_audio", lambda path, sr: decoded.append(path) or real(path, sr))
    bank = NoiseBank(tmp_path)  # the default budget holds all twelve (more than the old 8 files)
    for _ in range(2):
        for i in range(12):
            bank.load(i)
    assert len(decoded) == 12  # each decoded once
    small = NoiseBank(tmp_path, cache_bytes=3 * 6400)  # three files' worth
    decoded.clear()
    for i in (0, 1, 2, 0, 3, 1):  # 3 evicts 1, the least recently used, so 1 is decoded again
        small.load(i)
    assert [p.rsplit("/", 1)[-1] for p in decoded] == ["n00.wav", "n01.wav", "n02.wav", "n03.wav", "n01.wav"]
    assert pickle.loads(pickle.dumps(small))._cached_bytes == 0  # a data worker starts empty
    decoded.clear()
    none = NoiseBank(tmp_path, cache_files=0)
    none.load(0)
    none.load(0)
    assert len(decoded) == 2


def test_noise_bank_empty_folder(tmp_path):
    from mmssl.errors import DataError

    with pytest.raises(DataError, match="no audio files"):
        NoiseBank(tmp_path)


def test_snr_setting_is_one_value_or_a_range():
    assert snr_range(0) == (0.0, 0.0)
    assert snr_range([-5, 5]) == (-5.0, 5.0)
    for bad in ("0", [1, 2, 3], True):
        with pytest.raises(ConfigError, match="noise_snr"):
            snr_range(bad)


def test_silent_noise_is_an_error_naming_the_file(tmp_path):
    from mmssl.errors import DataError

    write_wav(tmp_path / "hum.wav", tone(4000, freq=300))
    write_wav(tmp_path / "zeros.wav", np.zeros(4000, dtype=np.float32))
    write_wav(tmp_path / "faint.wav", np.full(4000, 2e-6, np.float32), codec="pcm_f32le")  # not zero
    bank = NoiseBank(tmp_path)
    with pytest.raises(DataError, match="faint.wav: the noise is silent"):
        bank.check()
    assert bank.load(1).abs().max() > 0.1  # the loud one is fine
    silent = NoiseBank([tmp_path / "zeros.wav"])
    with pytest.raises(DataError, match="zeros.wav: the noise is silent"):
        silent.sample(1000)
    with pytest.raises(DataError, match="zeros.wav: the noise is silent"):
        AddNoise(silent, prob=1.0)(torch.randn(1000))
