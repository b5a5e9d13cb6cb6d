"""Hand-made speech features: Kaldi log filterbanks, MFCC (+ deltas), frame stacking.

Shape legend: S samples, T frames, C channels. All features use 25 ms windows every 10 ms
(100 Hz) with ``snip_edges=True``, so a waveform of ``S`` samples at 16 kHz gives
``T = 1 + (S - 400) // 160`` frames (0 when ``S < 400``), the count
``mmssl.nn.outputs.FrameSpec((400,), (160,))`` predicts.

The waveform is used at the scale it is given (float in [-1, 1] from ``mmssl.data.io``);
Kaldi itself reads int16 values, which only shifts every log energy by the constant
``2 * log(32768)``, removed by any later normalisation.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable

import torch
import torchaudio.compliance.kaldi as kaldi
import torchaudio.functional as AF
from torch import Tensor

from mmssl.constants import SAMPLE_RATE

FRAME_LENGTH_MS = 25.0
FRAME_SHIFT_MS = 10.0
# the Kaldi framing shared by fbank and mfcc: 25 ms / 10 ms, no dither, whole windows only
_KALDI_FRAMING = dict(
    frame_length=FRAME_LENGTH_MS, frame_shift=FRAME_SHIFT_MS, dither=0.0, energy_floor=0.0, snip_edges=True
)


def num_frames(num_samples: int, sample_rate: int = SAMPLE_RATE) -> int:
    """Frames a 25 ms / 10 ms window with ``snip_edges=True`` gives for ``num_samples``."""
    window = int(sample_rate * FRAME_LENGTH_MS / 1000)
    shift = int(sample_rate * FRAME_SHIFT_MS / 1000)
    return 0 if num_samples < window else 1 + (num_samples - window) // shift


def _check_waveform(waveform: Tensor, name: str) -> Tensor:
    if waveform.dim() != 1:
        raise ValueError(f"{name} expects a mono waveform (S,), got shape {tuple(waveform.shape)}")
    return waveform.float().unsqueeze(0)  # (1, S): kaldi functions take (channels, S)


def fbank(waveform: Tensor, sample_rate: int = SAMPLE_RATE, num_mel_bins: int = 80) -> Tensor:
    """Kaldi-compatible log mel filterbank: ``waveform (S,)`` -> ``(T, num_mel_bins)``.

    No dither (deterministic features, as fairseq and AV-HuBERT extract them). Input shorter
    than one window gives an empty ``(0, num_mel_bins)`` tensor.
    """
    wav = _check_waveform(waveform, "fbank")
    if num_frames(wav.shape[1], sample_rate) == 0:
        return wav.new_zeros(0, num_mel_bins)
    return kaldi.fbank(
        wav,
        num_mel_bins=num_mel_bins,
        sample_frequency=float(sample_rate),
        **_KALDI_FRAMING,
    )


def fbank_batch(
    audio: Tensor, lengths: Tensor, sample_rate: int = SAMPLE_RATE, num_mel_bins: int = 80
) -> tuple[Tensor, Tensor]:
    """``fbank`` of a padded batch in one pass (same device, no per-utterance loop):
    ``audio (B, S)``, ``lengths (B,)`` -> ``feats (B, T, num_mel_bins)``, ``frame_lens (B,)``.

    Row ``b`` equals ``fbank(audio[b, :lengths[b]])`` on its first ``frame_lens[b]`` frames
    and is zero after them. With ``snip_edges=True`` every frame sees only its own window, so
    the Kaldi steps apply per frame: remove the DC offset, pre-emphasis 0.97 (the first
    sample is its own predecessor), Povey window (Hann ** 0.85), power spectrum of the
    window zero-padded to 512 points, mel triangles from 20 Hz to Nyquist, log floored at
    float epsilon.
    """
    taper, banks = _fbank_constants(
        int(sample_rate * FRAME_LENGTH_MS / 1000), num_mel_bins, sample_rate, audio.device
    )

    def log_mels(x: Tensor, window: int, shift: int, lengths: Tensor) -> Tensor:
        x = x.unfold(-1, window, shift)  # (B, T, window)
        x = x - x.mean(-1, keepdim=True)
        previous = torch.cat([x[..., :1], x[..., :-1]], dim=-1)
        x = (x - 0.97 * previous) * taper  # Kaldi preemphasis_coefficient, then the window
        padded = 1 << (window - 1).bit_length()  # Kaldi round_to_power_of_two: 400 -> 512
        power = _power(torch.fft.rfft(x, n=padded))  # (B, T, padded/2 + 1)
        return (power @ banks.T).clamp(min=torch.finfo(torch.float32).eps).log()  # (B, T, F)

    return _framed_batch(audio, lengths, sample_rate, num_mel_bins, "fbank_batch", log_mels)


def _power(spectrum: Tensor) -> Tensor:
    """``|spectrum|^2`` as re^2 + im^2, with no square root to undo: for a 4-s query on one CPU
    thread 0.10 ms, where ``.abs().pow(2)`` took 0.37 (of the ~10 ms ``mmssl serve`` spends
    embedding it); the two agree to float rounding (2.4e-7 relative)."""
    return spectrum.real.square() + spectrum.imag.square()


def _framed_batch(
    audio: Tensor,
    lengths: Tensor,
    sample_rate: int,
    num_bins: int,
    name: str,
    features: Callable[[Tensor, int, int, Tensor], Tensor],
) -> tuple[Tensor, Tensor]:
    """What the batched filterbanks share: ``features(x, window, shift, lengths)`` of the float32
    waveform ``x (B, S)`` (also under autocast: log energies of small powers need the range)
    on whole 25 ms / 10 ms windows, then zeros after each row's ``frame_lens`` frames.
    Returns ``(feats (B, T, num_bins), frame_lens (B,))``."""
    if audio.dim() != 2:
        raise ValueError(f"{name} expects audio (B, S), got shape {tuple(audio.shape)}")
    window = int(sample_rate * FRAME_LENGTH_MS / 1000)
    shift = int(sample_rate * FRAME_SHIFT_MS / 1000)
    lengths = lengths.to(audio.device).long()
    frame_lens = torch.div(lengths - window, shift, rounding_mode="floor").add(1).clamp(min=0)
    b, s = audio.shape
    if s < window:
        return audio.new_zeros(b, 0, num_bins, dtype=torch.float32), frame_lens
    kind = audio.device.type
    with (
        torch.autocast(kind, enabled=False)
        if torch.amp.is_autocast_available(kind)
        else contextlib.nullcontext()
    ):
        feats = features(audio.float(), window, shift, lengths)  # (B, T, F)
    valid = torch.arange(feats.shape[1], device=feats.device) < frame_lens.unsqueeze(1)  # (B, T)
    return feats * valid.unsqueeze(-1), frame_lens


@functools.lru_cache(maxsize=16)
def _fbank_constants(
    window: int, num_mel_bins: int, sample_rate: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """The Povey window ``(window,)`` and mel triangles ``(F, padded/2 + 1)`` of ``fbank_batch``,
    made once per device: no host-to-device copy in the training step."""
    padded = 1 << (window - 1).bit_length()
    with torch.inference_mode(False), torch.no_grad():  # plain tensors, usable in any later mode
        taper = torch.hann_window(window, periodic=False, dtype=torch.float32).pow(0.85)  # Kaldi "povey"
        banks, _ = kaldi.get_mel_banks(
            num_mel_bins, padded, float(sample_rate), 20.0, 0.0, 100.0, -500.0, 1.0
        )
        banks = torch.nn.functional.pad(banks.float(), (0, 1))  # (F, padded/2 + 1): no Nyquist bin
        return taper.to(device), banks.to(device)


# python_speech_features ``logfbank`` (AV-HuBERT's audio features), its defaults: 25 ms frames
# every 10 ms, no window (rectangular), pre-emphasis 0.97 over the whole signal, a 512-point
# power spectrum divided by 512, triangles on FFT bins between 0 Hz and Nyquist, energies of
# exactly 0 replaced by float64's epsilon before the log
PSF_NFFT, PSF_PREEMPH = 512, 0.97
PSF_FLOOR = 2.220446049250313e-16  # numpy.finfo(float).eps


def logfbank_psf_batch(
    audio: Tensor, lengths: Tensor, sample_rate: int = SAMPLE_RATE, num_filters: int = 26
) -> tuple[Tensor, Tensor]:
    """``python_speech_features.logfbank`` of a padded batch, as AV-HuBERT's data loader
    computes its audio features: ``audio (B, S)``, ``lengths (B,)`` -> ``feats (B, T,
    num_filters)``, ``frame_lens (B,)``.

    Row ``b`` equals ``logfbank(audio[b, :lengths[b]], nfilt=num_filters)`` on its first
    ``frame_lens[b]`` frames and is zero after them. The frames are those of ``fbank_batch``
    (whole 25 ms windows, ``1 + (S - 400) // 160``): ``logfbank`` adds one more when the
    signal does not end on a frame boundary, a window zero-padded past the end, which is left
    out here so that every feature of mmssl counts frames one way. The waveform is used at the
    scale it is given: AV-HuBERT reads int16 values (``scipy.io.wavfile``), 32768 times mmssl's.
    """
    banks = _psf_banks(num_filters, sample_rate, audio.device)

    def log_energies(x: Tensor, window: int, shift: int, lengths: Tensor) -> Tensor:
        # pre-emphasis of the whole signal (its first sample kept), then zeros past its end
        x = torch.cat([x[:, :1], x[:, 1:] - PSF_PREEMPH * x[:, :-1]], dim=1)
        x = x * (torch.arange(x.shape[1], device=x.device) < lengths.unsqueeze(1))
        frames = x.unfold(-1, window, shift)  # (B, T, window), no window function
        power = _power(torch.fft.rfft(frames, n=PSF_NFFT)) / PSF_NFFT  # (B, T, 257)
        energies = power @ banks.T  # (B, T, F)
        return torch.where(energies == 0, torch.full_like(energies, PSF_FLOOR), energies).log()

    return _framed_batch(audio, lengths, sample_rate, num_filters, "logfbank_psf_batch", log_energies)


@functools.lru_cache(maxsize=16)
def _psf_banks(num_filters: int, sample_rate: int, device: torch.device) -> Tensor:
    """``python_speech_features.get_filterbanks(num_filters, 512, sample_rate)``: ``(F, 257)``
    triangles whose corners are FFT bins ``floor(513 * hz / sample_rate)`` of points equally
    spaced in mel (``2595 log10(1 + hz / 700)``) from 0 Hz to Nyquist."""
    with torch.inference_mode(False), torch.no_grad():
        high = 2595.0 * math.log10(1.0 + sample_rate / 2 / 700.0)
        mels = torch.linspace(0.0, high, num_filters + 2, dtype=torch.float64)
        hz = 700.0 * (10.0 ** (mels / 2595.0) - 1.0)
        corners = torch.floor((PSF_NFFT + 1) * hz / sample_rate)
        bins = torch.arange(PSF_NFFT // 2 + 1, dtype=torch.float64).unsqueeze(0)  # (1, 257)
        left, centre, right = corners[:-2, None], corners[1:-1, None], corners[2:, None]
        rising = ((bins - left) / (centre - left)) * ((bins >= left) & (bins < centre))
        falling = ((right - bins) / (right - centre)) * ((bins >= centre) & (bins < right))
        return (rising.nan_to_num() + falling.nan_to_num()).float().to(device)


def mfcc(waveform: Tensor, sample_rate: int = SAMPLE_RATE, deltas: bool = True) -> Tensor:
    """Kaldi MFCC at 100 Hz: ``waveform (S,)`` -> ``(T, 39)`` with deltas, else ``(T, 13)``.

    With ``deltas`` the 13 cepstra are followed by their deltas and delta-deltas (window of
    +-2 frames, Kaldi ``add-deltas``), the targets of HuBERT's first iteration (HuBERT,
    sec. 4.2: 39-dimensional MFCC features). ``use_energy=False`` as fairseq's
    ``dump_mfcc_feature``. Input shorter than one window gives ``(0, 39)`` / ``(0, 13)``.
    """
    wav = _check_waveform(waveform, "mfcc")
    dim = 39 if deltas else 13
    if num_frames(wav.shape[1], sample_rate) == 0:
        return wav.new_zeros(0, dim)
    ceps = kaldi.mfcc(
        wav,
        sample_frequency=float(sample_rate),
        use_energy=False,
        **_KALDI_FRAMING,
    )  # (T, 13)
    if not deltas:
        return ceps
    d1 = AF.compute_deltas(ceps.T, win_length=5).T  # compute_deltas runs over the last dim
    d2 = AF.compute_deltas(d1.T, win_length=5).T
    return torch.cat([ceps, d1, d2], dim=-1)  # (T, 39)


def stack_frames(x: Tensor, k: int = 4) -> Tensor:
    """Stack every ``k`` consecutive frames into one: ``(..., T, C)`` -> ``(..., ceil(T/k), k*C)``.

    Output frame ``i`` is ``concat(x[i*k], ..., x[i*k + k - 1])``; the last group is padded
    with zero frames (AV-HuBERT stacks 4 filterbank frames at 100 Hz to meet 25 fps video).
    """
    if k < 1:
        raise ValueError(f"stack_frames: k must be >= 1, got {k}")
    t, c = x.shape[-2], x.shape[-1]
    groups = -(-t // k)
    pad = groups * k - t
    if pad:
        zeros = x.new_zeros(*x.shape[:-2], pad, c)
        x = torch.cat([x, zeros], dim=-2)
    return x.reshape(*x.shape[:-2], groups, k * c)  # (..., T/k, k*C)
