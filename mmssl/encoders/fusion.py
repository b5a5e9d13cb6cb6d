"""Audio-visual fusion with modality dropout (AV-HuBERT, Shi et al., 2022, sec. 3.2).

Both streams are at 25 Hz. Fusion is concatenation along channels, LayerNorm, Linear (AV-HuBERT
``modality_fuse='concat'`` followed by ``layer_norm`` and ``post_extract_proj``). A modality the
batch lacks is fed as zeros *inside* the fusion, so one model serves audio-only, video-only and
audio-visual input.

Modality dropout (training only): with probability ``modality_dropout`` (AV-HuBERT
``modality_dropout=0.5``) one stream of an utterance is dropped; given a drop, the audio stream
is the one dropped with probability ``audio_dropout`` (``audio_dropout=0.5``). So 50% of the
utterances see both streams, 25% only video and 25% only audio. Unlike the original, which draws
one choice per batch, the draw is per utterance, and it is made on the host (no device sync).

Shape legend: B batch, T frames, C channels.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmssl.errors import ConfigError, DataError
from mmssl.nn.padding import lengths_to_padding_mask


def sample_keep(
    batch: int, modality_dropout: float, audio_dropout: float, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Modality dropout (AV-HuBERT): with probability ``modality_dropout`` an utterance loses one
    stream, the audio with probability ``audio_dropout``. Returns ``(keep_audio, keep_video)``,
    bool ``(B,)`` on the CPU."""
    drop = torch.rand(batch, generator=generator) < modality_dropout
    audio_first = torch.rand(batch, generator=generator) < audio_dropout
    return ~(drop & audio_first), ~(drop & ~audio_first)


class AVFusion(nn.Module):
    """``(audio (B, Ta, Ca) | None, video (B, Tv, Cv) | None)`` -> ``(B, T, C)``.

    With both streams ``T = min(Ta, Tv)`` and each utterance keeps ``min`` of its two lengths
    (the streams are aligned at their start; a frame or two of difference between audio and
    video is usual). Padded output frames are zero.
    """

    def __init__(
        self,
        audio_dim: int,
        video_dim: int,
        dim: int,
        modality_dropout: float = 0.5,
        audio_dropout: float = 0.5,
    ) -> None:
        super().__init__()
        for name, p in (("modality_dropout", modality_dropout), ("audio_dropout", audio_dropout)):
            if not 0.0 <= p <= 1.0:
                raise ConfigError(f"fusion: {name} must be in [0, 1], got {p}")
        self.audio_dim, self.video_dim, self.dim = audio_dim, video_dim, dim
        self.modality_dropout, self.audio_dropout = modality_dropout, audio_dropout
        self.norm = nn.LayerNorm(audio_dim + video_dim)
        self.proj = nn.Linear(audio_dim + video_dim, dim)

    def sample_keep(self, batch: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Which streams each utterance keeps under modality dropout: two bool ``(B,)`` on the CPU."""
        return sample_keep(batch, self.modality_dropout, self.audio_dropout, generator)

    def concat(
        self,
        audio: Tensor | None,
        audio_lens: Tensor | None,
        video: Tensor | None,
        video_lens: Tensor | None,
        keep: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The streams side by side before the LayerNorm: ``(features (B, T, Ca + Cv),
        lengths (B,))``, a dropped or missing stream as zeros, padded frames zero (AV-HuBERT's
        ``features``, on which its feature penalty is taken).

        ``keep``: ``(keep_audio (B,), keep_video (B,))`` bool; by default drawn with
        :meth:`sample_keep` in training when both streams are present, all True otherwise.
        """
        if audio is None and video is None:
            raise DataError("fusion needs audio or video; the batch has neither")
        if audio is not None and video is not None:
            if audio.shape[0] != video.shape[0]:
                raise DataError(f"audio batch of {audio.shape[0]} but video batch of {video.shape[0]}")
            t = min(audio.shape[1], video.shape[1])
            audio, video = audio[:, :t], video[:, :t]
            assert audio_lens is not None and video_lens is not None
            lengths = torch.minimum(audio_lens, video_lens).clamp(max=t)
            if keep is None and self.training and self.modality_dropout > 0:
                keep = self.sample_keep(audio.shape[0])
            if keep is not None:
                keep_a, keep_v = (k.to(audio.device, non_blocking=True) for k in keep)
                audio = audio * keep_a.view(-1, 1, 1).to(audio.dtype)
                video = video * keep_v.view(-1, 1, 1).to(video.dtype)
        elif audio is not None:
            assert audio_lens is not None
            lengths = audio_lens
            video = audio.new_zeros(*audio.shape[:2], self.video_dim)
        else:
            assert video is not None and video_lens is not None
            lengths = video_lens
            audio = video.new_zeros(*video.shape[:2], self.audio_dim)
        x = torch.cat([audio, video], dim=-1)  # (B, T, Ca + Cv)
        pad = lengths_to_padding_mask(lengths, x.shape[1])
        return x.masked_fill(pad.unsqueeze(-1), 0.0), lengths

    def project(self, features: Tensor, lengths: Tensor) -> Tensor:
        """``features (B, T, Ca + Cv)`` of :meth:`concat` -> ``(B, T, C)``: LayerNorm, Linear;
        padded frames zero."""
        x = self.proj(self.norm(features))  # (B, T, C)
        pad = lengths_to_padding_mask(lengths, x.shape[1])
        return x.masked_fill(pad.unsqueeze(-1), 0.0)

    def forward(
        self,
        audio: Tensor | None,
        audio_lens: Tensor | None,
        video: Tensor | None,
        video_lens: Tensor | None,
        keep: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Returns ``(x (B, T, C), lengths (B,))``: :meth:`concat`, then :meth:`project`."""
        features, lengths = self.concat(audio, audio_lens, video, video_lens, keep)
        return self.project(features, lengths), lengths
