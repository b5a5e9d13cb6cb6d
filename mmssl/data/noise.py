"""Additive noise at a target SNR, mixed on the waveform before any feature is computed.

SNR is RMS-based: ``snr_db = 20 log10(rms(clean) / rms(scaled noise))`` over the valid
samples. Shape legend: B batch, S samples.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from mmssl.constants import SAMPLE_RATE
from mmssl.data.io import load_audio
from mmssl.errors import ConfigError, DataError
from mmssl.nn.padding import lengths_to_padding_mask

AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".m4a")
# a noise recording quieter than this RMS (-100 dB re full scale, below one step of 16-bit
# audio) has no energy to scale to an SNR: it would add nothing and pass a clean result as noisy
SILENT_RMS = 1e-5


def check_noise(noise: Tensor, source: str) -> Tensor:
    """``noise (S,)``, after checking that it has energy to mix (a ``DataError`` naming
    ``source`` otherwise: scaled to any SNR it would add nothing)."""
    rms = float(noise.double().square().mean().sqrt()) if noise.numel() else 0.0
    if not rms > SILENT_RMS:  # also NaN
        raise DataError(
            f"{source}: the noise is silent (RMS {rms:.2g}, at most {SILENT_RMS:g}): mixed at any SNR it "
            "adds nothing; remove it from the noise files"
        )
    return noise


def fit_length(noise: Tensor, num_samples: int, generator: torch.Generator | None = None) -> Tensor:
    """``noise (S_n,)`` -> ``(num_samples,)``: looped when shorter, from a random offset
    (the loop wraps around, so every offset is usable)."""
    if noise.numel() == 0:
        raise DataError("noise of zero length")
    start = int(torch.randint(noise.numel(), (1,), generator=generator))
    index = (torch.arange(num_samples) + start) % noise.numel()
    return noise[index]


def _rms(x: Tensor, keep: Tensor) -> Tensor:
    """Root mean square over the ``keep`` samples of each row: ``(B, S)`` -> ``(B,)``."""
    count = keep.sum(-1).clamp(min=1)
    return ((x * x * keep).sum(-1) / count).sqrt()


def mix_at_snr(
    clean: Tensor,
    noise: Tensor,
    snr_db: float | Tensor,
    generator: torch.Generator | None = None,
    lengths: Tensor | None = None,
) -> Tensor:
    """Add ``noise`` to ``clean (S,)`` or ``(B, S)`` at ``snr_db`` (a float, or ``(B,)``).

    ``noise``: ``(S_n,)`` (each row takes its own random segment) or ``(B, S_n)`` (one per
    row), looped or cropped to ``S`` at a random offset. ``lengths (B,)``: valid samples of a
    padded batch; the RMS is measured there and padding stays zero. Silent clean audio gets
    no noise (the SNR is undefined; it stays silent), silent noise adds nothing; never NaN.
    """
    single = clean.dim() == 1
    x = clean.unsqueeze(0) if single else clean  # (B, S)
    b, s = x.shape
    if noise.dim() == 1:
        rows = [fit_length(noise, s, generator) for _ in range(b)]
    elif noise.dim() == 2 and noise.shape[0] == b:
        rows = [fit_length(n, s, generator) for n in noise]
    else:
        raise ValueError(f"noise must be (S_n,) or (B={b}, S_n), got {tuple(noise.shape)}")
    n = torch.stack(rows).to(x)  # (B, S)
    if lengths is None:
        keep = torch.ones_like(x)
    else:
        keep = (~lengths_to_padding_mask(lengths.to(x.device), s)).to(x.dtype)
    n = n * keep
    snr = torch.as_tensor(snr_db, dtype=x.dtype, device=x.device).expand(b)
    clean_rms, noise_rms = _rms(x, keep), _rms(n, keep)
    target = clean_rms / torch.pow(10.0, snr / 20)  # wanted noise RMS
    scale = torch.where(noise_rms > 0, target / noise_rms.clamp(min=1e-12), torch.zeros_like(target))
    out = x + scale.unsqueeze(-1) * n
    return out[0] if single else out


def snr_range(noise_snr: float | Sequence[float]) -> tuple[float, float]:
    """``objective.noise_snr``: one SNR in dB (AV-HuBERT ``noise_snr: 0``) or ``[low, high]``
    (drawn uniformly) -> ``(low, high)``."""
    if isinstance(noise_snr, (int, float)) and not isinstance(noise_snr, bool):
        return float(noise_snr), float(noise_snr)
    if isinstance(noise_snr, Sequence) and not isinstance(noise_snr, str) and len(noise_snr) == 2:
        return float(noise_snr[0]), float(noise_snr[1])
    raise ConfigError(f"objective.noise_snr must be a number or [low, high] in dB, got {noise_snr!r}")


class NoiseBank:
    """Noise recordings from a folder (searched recursively, e.g. MUSAN's ``noise/``) or a
    list of files, decoded on demand to mono at ``sample_rate``. Decoded files stay cached, the
    least recently used dropped first, up to ``cache_bytes`` of samples (256 MiB: 70 minutes
    at 16 kHz, a whole small noise set such as the built-in corpus's 32 files) and
    ``cache_files`` files (None: no count limit; 0: no cache). Each data worker holds its own.
    A silent file (``check_noise``) is a ``DataError`` naming it when it is decoded."""

    def __init__(
        self,
        folder_or_files: str | os.PathLike | Sequence[str | os.PathLike],
        sample_rate: int = SAMPLE_RATE,
        cache_files: int | None = None,
        cache_bytes: int = 256 << 20,
    ) -> None:
        if isinstance(folder_or_files, (str, os.PathLike)):
            folder = Path(folder_or_files)
            if not folder.is_dir():
                raise DataError(f"{folder}: noise folder not found")
            files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
            if not files:
                raise DataError(f"{folder}: no audio files ({', '.join(AUDIO_SUFFIXES)}) in the noise folder")
        else:
            files = [Path(p) for p in folder_or_files]
            if not files:
                raise DataError("NoiseBank: empty list of noise files")
        self.files = [str(p) for p in files]
        self.sample_rate = sample_rate
        self.cache_files, self.cache_bytes = cache_files, cache_bytes
        self._cache: OrderedDict[str, Tensor] = OrderedDict()
        self._cached_bytes = 0

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> Tensor:
        """The whole of file ``index`` as ``(S,)``."""
        path = self.files[index]
        if path in self._cache:
            self._cache.move_to_end(path)
            return self._cache[path]
        wav = check_noise(load_audio(path, self.sample_rate), path)
        self._cache[path] = wav
        self._cached_bytes += wav.nbytes
        limit = len(self._cache) if self.cache_files is None else self.cache_files
        while self._cache and (len(self._cache) > limit or self._cached_bytes > self.cache_bytes):
            self._cached_bytes -= self._cache.popitem(last=False)[1].nbytes
        return wav

    def check(self) -> None:
        """Decode every file once: a silent (or unreadable) one is a ``DataError`` naming it now,
        not when a draw first picks it."""
        for index in range(len(self.files)):
            self.load(index)

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> Tensor:
        """A random file, looped or cropped at a random offset to ``(num_samples,)``."""
        index = int(torch.randint(len(self.files), (1,), generator=generator))
        return fit_length(self.load(index), num_samples, generator)

    def __getstate__(self) -> dict:  # workers start with an empty cache
        return {**self.__dict__, "_cache": OrderedDict(), "_cached_bytes": 0}


class WhiteNoise:
    """Gaussian white noise where a :class:`NoiseBank` is expected (``sample``): the noise of a
    denoising objective built without a noise folder."""

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> Tensor:
        return torch.randn(num_samples, generator=generator)


class AddNoise:
    """Per-item transform ``audio (S,) -> (S,)``: with probability ``prob``, add noise from
    ``bank`` at an SNR drawn uniformly from ``snr_range`` (dB). Picklable, for data workers,
    where it draws from the worker's seeded global generator unless given one."""

    def __init__(
        self,
        bank: NoiseBank | WhiteNoise,
        prob: float = 1.0,
        snr_range: tuple[float, float] = (0.0, 20.0),
    ) -> None:
        if not 0.0 <= prob <= 1.0:
            raise ConfigError(f"AddNoise prob must be in [0, 1], got {prob}")
        low, high = snr_range
        if low > high:
            raise ConfigError(f"AddNoise snr_range {snr_range} has low > high")
        self.bank, self.prob, self.snr_range = bank, prob, (float(low), float(high))

    def __call__(self, audio: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if audio.numel() == 0 or float(torch.rand((), generator=generator)) >= self.prob:
            return audio
        low, high = self.snr_range
        snr = low + (high - low) * float(torch.rand((), generator=generator))
        return mix_at_snr(audio, self.bank.sample(audio.numel(), generator), snr, generator)
