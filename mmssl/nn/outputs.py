"""The data every encoder part hands on: encoder outputs, front-half features, frame counts.

They live beside the layers (``mmssl.nn``) so layers can build them without importing the
encoders package; ``mmssl.encoders.base`` re-exports them with the ``SpeechEncoder`` interface.
Shape legend: B batch, T frames, S samples, C channels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class EncoderOutput:
    """``hidden (B, T, C)``: the last layer; ``lengths (B,)``: valid frames; ``layers``: the
    output ``(B, T, C)`` of every transformer layer in order (``layers[-1]`` is ``hidden``
    before any final norm, as torchaudio's ``extract_features``); ``frame_rate`` in Hz;
    ``ffn``: each transformer layer's feed-forward output ``(B, T, C)`` before its last
    residual connection, filled only when asked (``TransformerEncoder.forward(..., keep_ffn=True)``,
    data2vec's targets), else empty."""

    hidden: Tensor
    lengths: Tensor
    layers: list[Tensor] = field(default_factory=list)
    frame_rate: float = 50.0
    ffn: list[Tensor] = field(default_factory=list)


@dataclass
class Features:
    """Output of a speech encoder's front half, before the context network.

    ``x (B, T, C)``: projected features, ready for masking and ``contextualize``;
    ``raw (B, T, F)``: frontend output before the projection (quantizer input, feature penalty);
    ``lengths (B,)``: valid frames;
    ``clean (B, T, C)``: ``x`` before the encoder's input dropout (fairseq's
    ``pre_encoder_features``, what data2vec's teacher reads); ``x`` itself when not given (an
    encoder without input dropout).
    """

    x: Tensor
    raw: Tensor
    lengths: Tensor
    clean: Tensor = None  # type: ignore[assignment]  (set to ``x`` by ``__post_init__``)

    def __post_init__(self) -> None:
        if self.clean is None:
            self.clean = self.x


@dataclass(frozen=True)
class FrameSpec:
    """Samples -> frames for a stack of strided windows; small and picklable, so data workers
    can size masks without the model. ``kernels``/``strides`` in samples per layer (a
    filterbank is one layer of 400/160), then ``stack`` frames are stacked into one
    (padding the last group, as AV-HuBERT does)."""

    kernels: tuple[int, ...]
    strides: tuple[int, ...]
    stack: int = 1

    @property
    def window(self) -> int:
        """The samples one output frame reads (its receptive field): each layer widens the
        previous one's by ``kernel - 1`` of its input hops, and a stack of frames adds
        ``stack - 1`` hops (a filterbank frame reads 400 samples; four stacked, 880)."""
        field, hop = 1, 1
        for k, s in zip(self.kernels, self.strides):
            field += (k - 1) * hop
            hop *= s
        return field + (self.stack - 1) * hop

    def __call__(self, samples: Tensor) -> Tensor:
        frames = samples.long()
        for k, s in zip(self.kernels, self.strides):
            frames = torch.div(frames - k, s, rounding_mode="floor") + 1
        frames = frames.clamp(min=0)
        if self.stack > 1:
            frames = torch.div(frames + self.stack - 1, self.stack, rounding_mode="floor")
        return frames
