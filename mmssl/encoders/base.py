"""The interface speech encoders share, and (re-exported from ``mmssl.nn.outputs``) what
every encoder returns.

Shape legend: B batch, T frames, S samples, C channels.
"""

from __future__ import annotations

from torch import Tensor, nn

from mmssl.errors import ConfigError
from mmssl.nn.outputs import EncoderOutput, Features, FrameSpec

__all__ = ["EncoderOutput", "Features", "FrameSpec", "SpeechEncoder", "check_depth"]


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

    Subclasses set ``dim`` (C), ``feature_dim`` (F), ``frame_rate`` and ``frame_spec``.
    """

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
