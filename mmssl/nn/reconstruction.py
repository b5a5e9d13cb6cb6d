"""Inputs, targets and losses shared by the generative (reconstruction) objectives: APC,
DeCoAR, the autoencoder and VQ-VAE, Mockingjay / TERA.

The generative family of speech SSL (Mohamed et al., 2022, "Self-supervised speech
representation learning: a review", sec. IV-A) reconstructs log mel filterbank frames; this
module gives

* ``log_mel`` / ``LogMelFrontend``: 80 Kaldi log mel filterbanks at 100 Hz, normalised per
  mel bin over the valid frames of each utterance (``"utterance"``), over the frames read so
  far (``"running"``: frame ``t`` depends on no later audio, for causal models) or not at all;
* ``StackedLogMelFrontend``: those frames stacked ``K`` at a time (Mockingjay's 1/3
  downsampling, the autoencoders' 50 Hz latents);
* ``SubsampledLogMelFrontend``: every ``K``-th of those frames (DeCoAR 2.0's 50 Hz input);
* ``masked_l1`` / ``masked_mse``: reconstruction losses averaged over the weighted frames and
  every feature, zero (not NaN) when nothing is weighted, with no host sync;
* ``shift_targets``: frame ``t + n`` as the target of frame ``t`` (APC's ``time_shift``);
* ``future_slices``: frames ``t + offset .. t + offset + K - 1`` as the targets of frame ``t``
  (DeCoAR's slices).

Shape legend: B batch, S samples, T frames, F features, M mel bins, K frames per stack / slice.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from mmssl.constants import SAMPLE_RATE
from mmssl.errors import ConfigError
from mmssl.nn.fbank import fbank_batch, stack_frames
from mmssl.nn.frontend import check_waveform
from mmssl.nn.outputs import FrameSpec
from mmssl.nn.padding import instance_norm, lengths_to_padding_mask

NORMALIZATIONS = ("utterance", "running", "none")
WINDOW, HOP = 400, 160  # 25 ms / 10 ms at 16 kHz: 100 Hz frames


def running_normalize(x: Tensor, lengths: Tensor, eps: float = 1e-5) -> Tensor:
    """Causal mean and variance normalisation of ``x (B, T, F)``: frame ``t`` is normalised
    per feature with the mean and (biased) variance of frames ``0..t`` of its utterance, so it
    depends on no later frame (the running statistics of streaming recognisers, as Kaldi's
    online CMVN). Frame 0 comes out 0 and frame ``t`` lies within ``+-sqrt(t)``; padded frames
    are zero. Cumulative sums in float32, taken relative to each utterance's first frame (a
    frame every later one has read) to keep ``E[x^2] - E[x]^2`` accurate; no host sync."""
    x = x.float()
    keep = (~lengths_to_padding_mask(lengths, x.shape[1])).unsqueeze(-1).float()  # (B, T, 1)
    y = (x - x[:, :1]) * keep  # (B, T, F)
    count = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=torch.float32)[None, :, None]  # (1, T, 1)
    mean = y.cumsum(1) / count
    var = (y.pow(2).cumsum(1) / count - mean.pow(2)).clamp(min=0.0)
    return (y - mean) * torch.rsqrt(var + eps) * keep


NORMALIZERS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "utterance": instance_norm,
    "running": running_normalize,
}


def _check_normalize(what: str, normalize: str) -> None:
    if normalize not in NORMALIZATIONS:
        raise ConfigError(f"{what}: normalize must be one of {', '.join(NORMALIZATIONS)}; got {normalize!r}")


def log_mel(
    audio: Tensor, audio_lens: Tensor, num_mel_bins: int = 80, normalize: str = "utterance"
) -> tuple[Tensor, Tensor]:
    """``audio (B, S)``, ``audio_lens (B,)`` -> ``x (B, T, M=num_mel_bins)``, ``lengths (B,)``.

    Kaldi log mel filterbanks (``mmssl.nn.fbank.fbank_batch``: 25 ms windows every 10 ms,
    100 Hz, each frame from its own window alone), then per mel bin: ``"utterance"`` shifts and
    scales each utterance to zero mean and unit variance over its valid frames (DeCoAR,
    Mockingjay / TERA and the autoencoders read per-utterance CMVN; frame ``t`` then depends on
    the whole clip); ``"running"`` uses the statistics of frames ``0..t`` only
    (``running_normalize``: APC, whose frame ``t`` must not depend on later audio); ``"none"``
    keeps the raw log energies. Padded frames are zero.
    """
    _check_normalize("log_mel", normalize)
    feats, lengths = fbank_batch(audio, audio_lens, SAMPLE_RATE, num_mel_bins)  # (B, T, M), zero padded
    if normalize in NORMALIZERS:
        feats = NORMALIZERS[normalize](feats, lengths)
    return feats, lengths


class LogMelFrontend(nn.Module):
    """``log_mel`` as a frontend module: ``audio (B, S)``, ``audio_lens (B,)`` ->
    ``(B, T, num_mel_bins)``, ``lengths (B,)`` at 100 Hz. No parameters."""

    def __init__(self, num_mel_bins: int = 80, normalize: str = "utterance") -> None:
        super().__init__()
        _check_normalize("log-mel frontend", normalize)
        if num_mel_bins < 1:
            raise ConfigError(f"log-mel frontend: num_mel_bins must be >= 1, got {num_mel_bins}")
        self.num_mel_bins, self.normalize = num_mel_bins, normalize
        self.out_dim = num_mel_bins
        self.frame_spec = FrameSpec((WINDOW,), (HOP,))
        self.frame_rate = SAMPLE_RATE / HOP
        self.receptive_field = WINDOW

    def forward(self, audio: Tensor, audio_lens: Tensor) -> tuple[Tensor, Tensor]:
        check_waveform(audio, audio_lens, self.receptive_field, "log-mel frontend")
        x, lengths = log_mel(audio, audio_lens, self.num_mel_bins, self.normalize)
        return x.to(audio.dtype), lengths

    def extra_repr(self) -> str:
        return f"num_mel_bins={self.num_mel_bins}, normalize={self.normalize!r}"


class StackedLogMelFrontend(nn.Module):
    """An injected ``LogMelFrontend`` (100 Hz) with every ``stack`` consecutive frames stacked
    into one (``mmssl.nn.fbank.stack_frames``; the last group padded with zero frames):
    ``audio (B, S)`` -> ``(B, T, F = stack * M)``, ``lengths (B,)`` = ``ceil(mel frames / stack)``.
    Mockingjay's 1/3 downsampling (sec. 2.2), the autoencoders' 50 Hz latents. No parameters."""

    def __init__(self, log_mel: LogMelFrontend, stack: int = 1) -> None:
        super().__init__()
        if stack < 1:
            raise ConfigError(f"stacked log-mel frontend: stack must be >= 1, got {stack}")
        self.log_mel, self.stack = log_mel, stack
        self.num_mel_bins = log_mel.out_dim
        self.out_dim = log_mel.out_dim * stack
        spec = log_mel.frame_spec
        self.frame_spec = FrameSpec(spec.kernels, spec.strides, stack)
        self.stacking = FrameSpec((), (), stack)  # mel frames -> stacked frames: ceil(n / stack)
        self.frame_rate = log_mel.frame_rate / stack
        self.receptive_field = log_mel.receptive_field

    def mels(self, audio: Tensor, audio_lens: Tensor) -> tuple[Tensor, Tensor]:
        """The unstacked log mels ``(B, T', M)`` (zero padded) and their 100 Hz ``lengths (B,)``."""
        return self.log_mel(audio, audio_lens)

    def stacked(self, mels: Tensor, mel_lens: Tensor) -> tuple[Tensor, Tensor]:
        """``mels (B, T', M)`` -> ``(B, ceil(T'/K), K * M)`` and the stacked ``lengths (B,)``."""
        return stack_frames(mels, self.stack), self.stacking(mel_lens)

    def forward(self, audio: Tensor, audio_lens: Tensor) -> tuple[Tensor, Tensor]:
        return self.stacked(*self.mels(audio, audio_lens))


class SubsampledLogMelFrontend(nn.Module):
    """An injected ``LogMelFrontend`` (100 Hz, normalised over every frame) keeping every
    ``every``-th frame (frames ``0, every, 2 every...``): ``audio (B, S)`` -> ``(B, T, M)``,
    ``lengths (B,)`` = ``ceil(mel frames / every)``. Unlike stacking, the frames in between are
    dropped: the released DeCoAR 2.0 model reads every second 10 ms frame of per-utterance
    normalised log mels (s3prl ``upstream/decoar2/audio.py``: ``y[::2]``, 50 Hz). No parameters."""

    def __init__(self, log_mel: LogMelFrontend, every: int = 2) -> None:
        super().__init__()
        if every < 1:
            raise ConfigError(f"subsampled log-mel frontend: every must be >= 1, got {every}")
        self.log_mel, self.every = log_mel, every
        self.num_mel_bins = self.out_dim = log_mel.out_dim
        spec = log_mel.frame_spec
        # keeping every ``every``-th frame is one more layer of kernel 1 and stride ``every``:
        # ceil(n / every) frames, each reading the 400 samples of the one mel frame it keeps
        self.frame_spec = FrameSpec((*spec.kernels, 1), (*spec.strides, every))
        self.frame_rate = log_mel.frame_rate / every
        self.receptive_field = log_mel.receptive_field

    def forward(self, audio: Tensor, audio_lens: Tensor) -> tuple[Tensor, Tensor]:
        mels, mel_lens = self.log_mel(audio, audio_lens)  # (B, T', M), 100 Hz
        lengths = torch.div(mel_lens + self.every - 1, self.every, rounding_mode="floor")
        return mels[:, :: self.every], lengths

    def extra_repr(self) -> str:
        return f"every={self.every}"


def _weighted_mean(per_element: Tensor, weight: Tensor) -> Tensor:
    """Mean of ``per_element (B, T, F)`` over the frames weighted by ``weight (B, T)`` and over
    every feature; 0 when the weights sum to 0 (the sum is clamped, never tested on the host)."""
    if weight.shape != per_element.shape[:2]:
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected {tuple(per_element.shape[:2])}")
    w = weight.to(per_element.dtype)
    total = (per_element * w.unsqueeze(-1)).sum()
    count = w.sum() * per_element.shape[-1]
    return total / count.clamp(min=torch.finfo(per_element.dtype).tiny)


def _kept_difference(pred: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """``pred - target`` in float32 where ``weight (B, T)`` is non-zero, else 0; selecting before
    any non-linearity keeps NaN in an unweighted frame out of the value and the gradient."""
    return torch.where(weight.unsqueeze(-1) != 0, pred.float() - target.float(), 0.0)


def masked_l1(pred: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """``mean |pred - target|`` over the frames weighted by ``weight (B, T)`` (bool or float)
    and over every feature; ``pred``, ``target (B, T, F)``. A frame of weight 0 never reaches
    the loss, even when it holds NaN or inf; nothing weighted gives 0. Computed in float32."""
    return _weighted_mean(_kept_difference(pred, target, weight).abs(), weight)


def masked_mse(pred: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """``mean (pred - target)^2``, weighted as ``masked_l1``."""
    return _weighted_mean(_kept_difference(pred, target, weight) ** 2, weight)


RECONSTRUCTION_LOSSES = {"l1": masked_l1, "mse": masked_mse}


def reconstruction_loss(kind: str) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """``masked_l1`` or ``masked_mse`` by name (``"l1"`` / ``"mse"``); ``ConfigError`` otherwise."""
    try:
        return RECONSTRUCTION_LOSSES[kind]
    except KeyError:
        raise ConfigError(
            f"reconstruction loss must be one of {', '.join(RECONSTRUCTION_LOSSES)}; got {kind!r}"
        ) from None


def shift_targets(x: Tensor, lengths: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Frame ``t + n`` as the target of frame ``t``: ``x (B, T, F)``, ``lengths (B,)`` ->
    ``target (B, T, F)`` (``target[:, t] = x[:, t + n]``, zero past the end) and
    ``weight (B, T)`` bool, True where ``t + n < lengths``: the last ``n`` valid frames of each
    utterance, and its padding, have no target (APC's L1 loss, Chung et al. 2019)."""
    if n < 0:
        raise ConfigError(f"shift_targets: the shift must be >= 0, got {n}")
    b, t, f = x.shape
    shifted = torch.cat([x[:, n:], x.new_zeros(b, min(n, t), f)], dim=1)  # (B, T, F)
    frames = torch.arange(t, device=x.device)
    weight = (frames + n).unsqueeze(0) < lengths.unsqueeze(1)  # (B, T)
    return shifted, weight


def future_slices(x: Tensor, lengths: Tensor, k: int, offset: int = 0) -> tuple[Tensor, Tensor]:
    """Slices of ``k`` frames starting ``offset`` frames after each frame: ``x (B, T, F)`` ->
    ``targets (B, T, K, F)`` with ``targets[:, t, j] = x[:, t + offset + j]`` and
    ``weight (B, T, K)`` bool, True where ``t + offset + j < lengths`` (zeros past the end)."""
    if k < 1 or offset < 0:
        raise ConfigError(f"future_slices: need k >= 1 and offset >= 0; got k={k}, offset={offset}")
    b, t, f = x.shape
    need = t + offset + k - 1
    padded = (
        torch.cat([x, x.new_zeros(b, need - t, f)], dim=1) if need > t else x
    )  # (B, T + offset + K - 1, F)
    windows = padded[:, offset:].unfold(1, k, 1)[:, :t]  # (B, T, F, K)
    targets = windows.permute(0, 1, 3, 2)  # (B, T, K, F)
    index = torch.arange(t, device=x.device)[:, None] + offset + torch.arange(k, device=x.device)  # (T, K)
    weight = index.unsqueeze(0) < lengths[:, None, None]  # (B, T, K)
    return targets, weight
