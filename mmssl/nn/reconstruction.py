"""Inputs, targets and losses shared by the generative (reconstruction) objectives: APC,
DeCoAR, the autoencoder and VQ-VAE, Mockingjay / TERA.

The generative family of speech SSL (Mohamed et al., 2022, "Self-supervised speech
representation learning: a review", sec. IV-A) reconstructs log mel filterbank frames; this
module gives

* ``log_mel`` / ``LogMelFrontend``: 80 Kaldi log mel filterbanks at 100 Hz with
  per-utterance mean and variance normalisation over the valid frames only;
* ``masked_l1`` / ``masked_mse``: reconstruction losses averaged over the weighted frames and
  every feature, zero (not NaN) when nothing is weighted, with no host sync;
* ``shift_targets``: frame ``t + n`` as the target of frame ``t`` (APC's ``time_shift``);
* ``future_slices``: frames ``t + offset .. t + offset + K - 1`` as the targets of frame ``t``
  (DeCoAR's slices).

Shape legend: B batch, S samples, T frames, F features, K frames per slice.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from mmssl.data.features import fbank_batch
from mmssl.errors import ConfigError
from mmssl.nn.frontend import check_waveform
from mmssl.nn.outputs import FrameSpec
from mmssl.nn.padding import lengths_to_padding_mask

NORMALIZATIONS = ("utterance", "none")
SAMPLE_RATE = 16000
WINDOW, HOP = 400, 160  # 25 ms / 10 ms at 16 kHz: 100 Hz frames


def normalize_utterances(x: Tensor, lengths: Tensor, eps: float = 1e-5) -> Tensor:
    """Per-utterance, per-feature mean and variance normalisation of ``x (B, T, F)`` using only
    the first ``lengths (B,)`` frames; padded frames come out zero. Statistics in float32."""
    keep = (~lengths_to_padding_mask(lengths, x.shape[1])).unsqueeze(-1).float()  # (B, T, 1)
    x = x.float()
    count = lengths.clamp(min=1).float()[:, None, None]  # (B, 1, 1)
    mean = (x * keep).sum(1, keepdim=True) / count  # (B, 1, F)
    var = (((x - mean) * keep) ** 2).sum(1, keepdim=True) / count
    return (x - mean) * torch.rsqrt(var + eps) * keep


def log_mel(
    audio: Tensor, audio_lens: Tensor, num_mel_bins: int = 80, normalize: str = "utterance"
) -> tuple[Tensor, Tensor]:
    """``audio (B, S)``, ``audio_lens (B,)`` -> ``x (B, T, F=num_mel_bins)``, ``lengths (B,)``.

    Kaldi log mel filterbanks (``mmssl.data.features.fbank_batch``: 25 ms windows every 10 ms,
    100 Hz), then, with ``normalize="utterance"``, each utterance's features are shifted and
    scaled to zero mean and unit variance per mel bin over its valid frames (APC and DeCoAR
    read 80-d log mels with per-utterance CMVN). Padded frames are zero. ``normalize="none"``
    keeps the raw log energies.
    """
    if normalize not in NORMALIZATIONS:
        raise ConfigError(f"log_mel: normalize must be one of {', '.join(NORMALIZATIONS)}; got {normalize!r}")
    feats, lengths = fbank_batch(audio, audio_lens, SAMPLE_RATE, num_mel_bins)  # (B, T, F), zero padded
    if normalize == "utterance":
        feats = normalize_utterances(feats, lengths)
    return feats, lengths


class LogMelFrontend(nn.Module):
    """``log_mel`` as a frontend module: ``audio (B, S)``, ``audio_lens (B,)`` ->
    ``(B, T, num_mel_bins)``, ``lengths (B,)`` at 100 Hz. No parameters."""

    def __init__(self, num_mel_bins: int = 80, normalize: str = "utterance") -> None:
        super().__init__()
        if normalize not in NORMALIZATIONS:
            raise ConfigError(f"log-mel frontend: normalize must be one of {', '.join(NORMALIZATIONS)}; "
                              f"got {normalize!r}")
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
        raise ConfigError(f"reconstruction loss must be one of {', '.join(RECONSTRUCTION_LOSSES)}; "
                          f"got {kind!r}") from None


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
    padded = torch.cat([x, x.new_zeros(b, need - t, f)], dim=1) if need > t else x  # (B, T + offset + K - 1, F)
    windows = padded[:, offset:].unfold(1, k, 1)[:, :t]  # (B, T, F, K)
    targets = windows.permute(0, 1, 3, 2)  # (B, T, K, F)
    index = torch.arange(t, device=x.device)[:, None] + offset + torch.arange(k, device=x.device)  # (T, K)
    weight = index.unsqueeze(0) < lengths[:, None, None]  # (B, T, K)
    return targets, weight
