"""Speech frontends: waveform ``(B, S)`` + ``lengths (B,)`` -> frames ``(B, T, F)`` + ``lengths``.

* ``ConvFrontend``: the wav2vec 2.0 convolutional feature encoder (sec. 2 and 4.2: seven
  512-channel convolutions, kernels (10, 3, 3, 3, 3, 2, 2), strides (5, 2, 2, 2, 2, 2, 2),
  GELU; 400-sample receptive field, 320-sample hop, 50 Hz). Normalisation is either a group
  norm with one group per channel in the first layer only (base models, fairseq
  ``extractor_mode=default``) or a layer norm over channels in every layer (large models,
  ``extractor_mode=layer_norm``).
* ``FbankFrontend``: Kaldi log mel filterbanks at 100 Hz (80 by default), optionally stacked
  x4 to 25 Hz to meet 25 fps video (AV-HuBERT, sec. 4), and optionally layer-normed per
  stacked frame (AV-HuBERT ``normalize: true``).

Both are padding-aware: valid frames depend only on valid samples (the group norm takes its
statistics over valid frames only), so a padded batch gives each utterance what it gets alone.

Shape legend: B batch, S samples, T frames, C channels, F features per frame.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmssl.constants import SAMPLE_RATE
from mmssl.errors import ConfigError, DataError
from mmssl.nn.fbank import fbank_batch, logfbank_psf_batch, stack_frames
from mmssl.nn.outputs import FrameSpec
from mmssl.nn.padding import lengths_to_padding_mask

# wav2vec 2.0, sec. 4.2 (fairseq ``conv_feature_layers``)
WAV2VEC2_KERNELS = (10, 3, 3, 3, 3, 2, 2)
WAV2VEC2_STRIDES = (5, 2, 2, 2, 2, 2, 2)


def _frame_spec(kernels: tuple[int, ...], strides: tuple[int, ...], stack: int = 1) -> FrameSpec:
    return FrameSpec(kernels, strides, stack)


def check_waveform(audio: Tensor, lengths: Tensor, min_samples: int, what: str) -> None:
    """Shape checks that need no device sync; ``what`` names the caller in the error."""
    if audio.dim() != 2:
        raise DataError(f"{what}: expected audio (B, S), got shape {tuple(audio.shape)}")
    if lengths.shape != audio.shape[:1]:
        raise DataError(f"{what}: audio_lens has shape {tuple(lengths.shape)}, expected ({audio.shape[0]},)")
    if audio.shape[1] < min_samples:
        raise DataError(
            f"{what}: the batch has {audio.shape[1]} samples, shorter than the {min_samples}-sample "
            "window of one frame; every clip this short gives no frames"
        )


class MaskedGroupNorm(nn.Module):
    """Group norm with one group per channel whose statistics cover only valid frames.

    Same parameters and, without padding, same output as ``nn.GroupNorm(C, C)``. ``x (B, C, T)``,
    ``lengths (B,)`` -> ``(B, C, T)``.
    """

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        dtype, x = x.dtype, x.float()  # statistics in float32, also under autocast
        keep = (~lengths_to_padding_mask(lengths, x.shape[-1])).unsqueeze(1).float()  # (B, 1, T)
        count = lengths.clamp(min=1).float()[:, None, None]
        mean = (x * keep).sum(-1, keepdim=True) / count
        var = (((x - mean) * keep) ** 2).sum(-1, keepdim=True) / count
        y = (x - mean) * torch.rsqrt(var + self.eps)
        return (y * self.weight[:, None] + self.bias[:, None]).to(dtype)


class ChannelLayerNorm(nn.LayerNorm):
    """Layer norm over channels of a ``(B, C, T)`` tensor."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class ConvBlock(nn.Module):
    """Conv1d -> optional norm -> GELU, with the output length rule of the convolution."""

    def __init__(self, conv: nn.Conv1d, norm: nn.Module | None) -> None:
        super().__init__()
        self.conv, self.norm = conv, norm

    def forward(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        x = self.conv(x)
        k, s = self.conv.kernel_size[0], self.conv.stride[0]
        lengths = (torch.div(lengths - k, s, rounding_mode="floor") + 1).clamp(min=0)
        if isinstance(self.norm, MaskedGroupNorm):
            x = self.norm(x, lengths)
        elif self.norm is not None:
            x = self.norm(x)
        return F.gelu(x), lengths


class ConvFrontend(nn.Module):
    """Waveform convolutional feature encoder. ``audio (B, S)`` -> ``(B, T, C_last)``."""

    def __init__(self, blocks: list[ConvBlock]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.out_dim = blocks[-1].conv.out_channels
        kernels = tuple(b.conv.kernel_size[0] for b in blocks)
        strides = tuple(b.conv.stride[0] for b in blocks)
        self.frame_spec = _frame_spec(kernels, strides)
        self.hop = math.prod(strides)
        self.frame_rate = SAMPLE_RATE / self.hop
        self.receptive_field = self.frame_spec.window  # samples needed for one frame

    def forward(self, audio: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        check_waveform(audio, lengths, self.receptive_field, "conv frontend")
        x = audio.unsqueeze(1)  # (B, 1, S)
        for block in self.blocks:
            x, lengths = block(x, lengths)
        return x.transpose(1, 2), lengths  # (B, T, C)


def build_conv_frontend(
    channels: int | tuple[int, ...] = 512,
    kernels: tuple[int, ...] = WAV2VEC2_KERNELS,
    strides: tuple[int, ...] = WAV2VEC2_STRIDES,
    norm: str = "group",
    bias: bool = False,
) -> ConvFrontend:
    """wav2vec 2.0 feature encoder. ``norm``: ``"group"`` (first layer only, base models),
    ``"layer"`` (every layer, large models) or ``"none"``; ``bias``: conv bias (fairseq
    ``conv_bias``: False for base, True for large)."""
    if len(kernels) != len(strides) or not kernels:
        raise ConfigError(f"conv frontend: {len(kernels)} kernels but {len(strides)} strides")
    widths = (channels,) * len(kernels) if isinstance(channels, int) else tuple(channels)
    if len(widths) != len(kernels):
        raise ConfigError(f"conv frontend: {len(widths)} channel widths for {len(kernels)} layers")
    if norm not in ("group", "layer", "none"):
        raise ConfigError(f"conv frontend: norm must be 'group', 'layer' or 'none', got {norm!r}")
    blocks, c_in = [], 1
    for i, (c, k, s) in enumerate(zip(widths, kernels, strides)):
        conv = nn.Conv1d(c_in, c, k, stride=s, bias=bias)
        nn.init.kaiming_normal_(conv.weight)  # fairseq ConvFeatureExtractionModel
        layer_norm: nn.Module | None = None
        if norm == "group" and i == 0:
            layer_norm = MaskedGroupNorm(c)
        elif norm == "layer":
            layer_norm = ChannelLayerNorm(c)
        blocks.append(ConvBlock(conv, layer_norm))
        c_in = c
    return ConvFrontend(blocks)


# the filterbanks FbankFrontend computes: Kaldi's (torchaudio.compliance.kaldi.fbank), or
# python_speech_features' logfbank (AV-HuBERT's data loader; read by converted AV-HuBERT runs)
FBANK_KINDS = ("kaldi", "psf")
INT16_SCALE = 32768.0  # AV-HuBERT reads its waveforms as int16 values


class FbankFrontend(nn.Module):
    """Kaldi log mel filterbanks (25 ms / 10 ms, 100 Hz), ``stack`` frames stacked into one.

    ``audio (B, S)`` -> ``(B, T, num_mel_bins * stack)``. The whole padded batch is computed
    in one pass on its device (``mmssl.nn.fbank.fbank_batch``, no host sync); each
    utterance gets the features of its valid samples alone, zeros after its last frame.

    ``normalize``: each stacked frame is layer-normed over its ``num_mel_bins * stack``
    values, no learned scale or shift (AV-HuBERT ``normalize: true``: its dataset applies
    ``F.layer_norm(feats, feats.shape[1:])`` to the stacked ``(T, F)`` features). A gain on
    the waveform only shifts every log energy, so it changes no frame. One difference: in the
    last frame of an utterance whose 100 Hz frame count is not a multiple of ``stack``, the
    statistics cover the real filterbank frames only and the zero padding becomes 0 (the
    frame's mean). The reference normalises that frame with its padding zeros, which in its
    int16-scale log energies sit far below speech but here (a [-1, 1] waveform) sit inside
    the speech range, and would make the frame depend on the gain.

    ``kind="psf"``: AV-HuBERT's own features instead, for its converted checkpoints:
    ``python_speech_features.logfbank`` of the int16-scaled waveform
    (``mmssl.nn.fbank.logfbank_psf_batch``), every stacked frame layer-normed with its padding
    zeros, as the reference's loader does (on the frames of whole windows: see there).
    """

    def __init__(
        self,
        num_mel_bins: int = 80,
        stack: int = 4,
        sample_rate: int = SAMPLE_RATE,
        normalize: bool = False,
        kind: str = "kaldi",
    ) -> None:
        super().__init__()
        if stack < 1:
            raise ConfigError(f"fbank frontend: stack must be >= 1, got {stack}")
        if kind not in FBANK_KINDS:
            raise ConfigError(f"fbank frontend: audio features must be one of {FBANK_KINDS}, got {kind!r}")
        self.num_mel_bins, self.stack, self.sample_rate = num_mel_bins, stack, sample_rate
        self.normalize, self.kind = normalize, kind
        window, shift = sample_rate // 40, sample_rate // 100  # 25 ms, 10 ms
        self.frame_spec = _frame_spec((window,), (shift,), stack)
        self.receptive_field = window
        self.out_dim = num_mel_bins * stack
        self.frame_rate = sample_rate / shift / stack

    def forward(self, audio: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        check_waveform(audio, lengths, self.receptive_field, "fbank frontend")
        if self.kind == "psf":  # AV-HuBERT's features, from the int16 values it reads
            feats, fbank_lens = logfbank_psf_batch(
                audio * INT16_SCALE, lengths, self.sample_rate, self.num_mel_bins
            )
        else:
            feats, fbank_lens = fbank_batch(audio, lengths, self.sample_rate, self.num_mel_bins)
        # (B, T, F), zero padded: frames past an utterance's end are zero, so its last group
        # is padded with zero frames exactly as stacking it alone would
        stacked = stack_frames(feats, self.stack)  # (B, T / stack, F * stack)
        if self.normalize and self.kind == "psf":  # the reference's normalisation, padding included
            stacked = F.layer_norm(stacked.float(), stacked.shape[-1:])
        elif self.normalize:
            stacked = self._normalize(stacked, fbank_lens, feats.shape[1])
        return stacked.to(audio.dtype), self.frame_spec(lengths)

    def _normalize(self, stacked: Tensor, fbank_lens: Tensor, fbank_frames: int) -> Tensor:
        """Layer norm of each stacked frame ``(B, T, F * stack)`` over its real filterbank
        frames (``fbank_lens (B,)`` of the ``fbank_frames`` 100 Hz frames); padding -> 0."""
        real = ~lengths_to_padding_mask(fbank_lens, fbank_frames)  # (B, T100)
        real = stack_frames(real.unsqueeze(-1).float(), self.stack)  # (B, T, stack)
        w = real.repeat_interleave(self.num_mel_bins, dim=-1)  # (B, T, stack * F), layout of stacked
        x = stacked.float()
        count = w.sum(-1, keepdim=True).clamp(min=1.0)
        mean = (x * w).sum(-1, keepdim=True) / count
        var = ((x - mean).square() * w).sum(-1, keepdim=True) / count
        return (x - mean) * torch.rsqrt(var + 1e-5) * w  # F.layer_norm's eps
