"""The two kinds of encoder an objective can be given, declared as base classes, and
(re-exported from ``mmssl.nn.outputs``) what every encoder returns:

* :class:`SpeechEncoder`: a waveform in, frames out (``extract`` then ``contextualize``);
* :class:`AudioVisualEncoder`: audio and/or lip video in, one stream of fused frames out
  (``streams``, ``fuse``, ``contextualize``), as AV-HuBERT's encoder (``mmssl.encoders.av``).

Code that treats the two differently asks ``isinstance(encoder, AudioVisualEncoder)``.

Shape legend: B batch, T frames, S samples, C channels.
"""

from __future__ import annotations

from torch import Tensor, nn

from mmssl.errors import ConfigError
from mmssl.nn.outputs import EncoderOutput, Features, FrameSpec

__all__ = ["AudioVisualEncoder", "EncoderOutput", "Features", "FrameSpec", "SpeechEncoder", "check_depth"]


def check_depth(what: str, num_layers: int | None, total: int) -> int:
    """How many of an encoder's ``total`` layers ``contextualize(..., num_layers)`` runs: all of
    them for None, else ``num_layers``; ``ConfigError`` naming ``what`` outside ``[1, total]``."""
    depth = total if num_layers is None else num_layers
    if not 1 <= depth <= total:
        raise ConfigError(f"{what}: num_layers must be in [1, {total}], got {num_layers}")
    return depth


class SpeechEncoder(nn.Module):
    """Waveform in, frames out, split in two halves so objectives can act in between
    (mask the projected features, quantize the raw ones, feed a teacher).

    Subclasses set ``frontend`` (waveform -> raw features), ``dim`` (C), ``feature_dim`` (F),
    ``frame_rate`` and ``frame_spec``.
    """

    frontend: nn.Module
    dim: int
    feature_dim: int
    frame_rate: float
    frame_spec: FrameSpec

    def frame_lengths(self, audio_lens: Tensor) -> Tensor:
        return self.frame_spec(audio_lens)

    def extract(self, audio: Tensor, audio_lens: Tensor) -> Features:
        """``audio (B, S)`` -> ``Features``."""
        raise NotImplementedError

    def contextualize(self, x: Tensor, lengths: Tensor) -> EncoderOutput:
        """``x (B, T, C)`` (possibly masked) -> ``EncoderOutput``."""
        raise NotImplementedError

    def forward(self, audio: Tensor, audio_lens: Tensor) -> EncoderOutput:
        feats = self.extract(audio, audio_lens)
        return self.contextualize(feats.x, feats.lengths)


class AudioVisualEncoder(nn.Module):
    """Audio and/or lip video in, fused frames out, in halves so objectives can act in between
    (mask the audio stream, drop a modality, substitute video frames).

    Subclasses set ``dim`` (C), ``frame_rate``, ``frame_spec`` (the audio stream's, or None
    without one), ``fusion`` (with ``modality_dropout``, ``audio_dropout`` and ``audio_dim``) and
    ``audio_mask_embedding`` (None when nothing masks the audio stream).
    """

    dim: int
    frame_rate: float
    frame_spec: FrameSpec | None

    @property
    def modalities(self) -> tuple[str, ...]:
        """The streams it has: ``("audio", "video")``, or one of them."""
        raise NotImplementedError

    def streams(self, batch: dict) -> dict[str, Tensor | None]:
        """Each stream of ``batch`` before fusion: ``audio``, ``audio_raw``, ``audio_lens``,
        ``video``, ``video_lens`` (None for a stream the batch or the encoder lacks)."""
        raise NotImplementedError

    def mask_audio(self, x: Tensor, mask: Tensor) -> Tensor:
        """Frames of the audio stream ``x (B, T, C)`` where ``mask (B, T)`` replaced by the mask embedding."""
        raise NotImplementedError

    def fuse(
        self,
        audio: Tensor | None,
        audio_lens: Tensor | None,
        video: Tensor | None,
        video_lens: Tensor | None,
        keep: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The streams -> the transformer's input ``(x (B, T, C), lengths (B,))``."""
        raise NotImplementedError

    def fused_input(self, batch: dict) -> tuple[Tensor, Tensor]:
        """The transformer's input ``(x (B, T, C), lengths (B,))`` from the ``audio``/``audio_lens``
        and/or ``video``/``video_lens`` of ``batch`` (modality dropout applies in training)."""
        s = self.streams(batch)
        return self.fuse(s["audio"], s["audio_lens"], s["video"], s["video_lens"])

    def contextualize(self, x: Tensor, lengths: Tensor) -> EncoderOutput:
        """``x (B, T, C)`` -> ``EncoderOutput``."""
        raise NotImplementedError

    def encode(self, batch: dict) -> EncoderOutput:
        """Run on whichever of audio / video the batch has; a missing one is zeros in the fusion."""
        return self.contextualize(*self.fused_input(batch))
