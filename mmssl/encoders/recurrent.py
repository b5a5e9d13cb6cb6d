"""Recurrent speech encoders over normalised log mel filterbanks, for the generative objectives.

* ``build_apc_encoder``: unidirectional LSTM layers with residual connections (APC, Chung et
  al. 2019: three 512-unit layers) on log mels with *running* normalisation
  (``mmssl.nn.reconstruction.running_normalize``), so output frame ``t`` depends only on audio
  up to the end of frame ``t``'s window. It is a ``CPCEncoder`` (``mmssl.encoders.audio``:
  frontend -> causal context network) on a ``LogMelFrontend``; its layers are the LSTM
  layers' outputs.
* ``BiRecurrentEncoder``: a forward and a backward stack of unidirectional LSTM layers (DeCoAR,
  Ling et al. 2020: four layers of 1024 units each way in the released model) on log mels with
  per-utterance normalisation. Its layers are the concatenated ``[forward_t; backward_t]``
  states, as the DeCoAR features are read.

Both read ``log_mel`` (``mmssl.nn.reconstruction``: 80 bins at 100 Hz) and keep the
speech-encoder contract (``extract`` + ``contextualize``, every layer in
``EncoderOutput.layers``), so ``mmssl extract``, ``mmssl kmeans --checkpoint`` and ``mmssl
layers`` read them like any other encoder. Neither is registered in ``ENCODERS``: they come
with their objectives (``apc``, ``decoar``).

The backward stack runs on each utterance reversed within its own length (padding stays at
the end), so no padded frame ever reaches a valid state in either direction.

Shape legend: B batch, S samples, T frames, F mel bins, C channels.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmssl.encoders.audio import CPCEncoder
from mmssl.encoders.base import EncoderOutput, Features, SpeechEncoder, check_depth
from mmssl.errors import ConfigError
from mmssl.nn.context import QuantizedRecurrentContext, RecurrentContext
from mmssl.nn.quantizer import GumbelProductQuantizer
from mmssl.nn.reconstruction import LogMelFrontend


def reverse_padded(x: Tensor, lengths: Tensor) -> Tensor:
    """Reverse each sequence of ``x (B, T, C)`` within its first ``lengths (B,)`` frames; the
    padded frames stay where they are. Its own inverse. One gather, no host sync."""
    t = x.shape[1]
    steps = torch.arange(t, device=x.device).unsqueeze(0)  # (1, T)
    last = lengths.to(x.device).unsqueeze(1) - 1  # (B, 1)
    index = torch.where(steps <= last, last - steps, steps)  # (B, T)
    return x.gather(1, index.unsqueeze(-1).expand_as(x))


class BiRecurrentEncoder(SpeechEncoder):
    """``LogMelFrontend`` -> a forward and a backward ``RecurrentContext`` of the same depth.

    ``directions`` gives both stacks' layer outputs apart (DeCoAR's objective pairs the forward
    state at ``t`` with the backward state at ``t + K``); ``contextualize`` concatenates them per
    frame: ``hidden (B, T, 2C)``."""

    def __init__(
        self, frontend: LogMelFrontend, forward_net: RecurrentContext, backward_net: RecurrentContext
    ) -> None:
        super().__init__()
        if len(forward_net.layers) != len(backward_net.layers) or forward_net.dim != backward_net.dim:
            raise ConfigError(
                "bidirectional encoder: the forward and backward stacks must have the same shape"
            )
        self.frontend, self.forward_net, self.backward_net = frontend, forward_net, backward_net
        self.dim = 2 * forward_net.dim
        self.feature_dim = frontend.out_dim
        self.frame_rate = frontend.frame_rate
        self.frame_spec = frontend.frame_spec

    @property
    def num_layers(self) -> int:
        return len(self.forward_net.layers)

    def extract(self, audio: Tensor, audio_lens: Tensor) -> Features:
        """``audio (B, S)``, ``audio_lens (B,)`` -> ``Features`` with ``x = raw`` log mels ``(B, T, F)``."""
        x, lengths = self.frontend(audio, audio_lens)
        return Features(x=x, raw=x, lengths=lengths)

    def directions(
        self, x: Tensor, lengths: Tensor, num_layers: int | None = None
    ) -> tuple[list[Tensor], list[Tensor]]:
        """``x (B, T, F)`` -> (forward layers, backward layers), each a list of ``(B, T, C)``.
        Forward state ``t`` has read frames ``0..t``; backward state ``t`` frames ``t..lengths-1``."""
        depth = check_depth("bidirectional encoder", num_layers, self.num_layers)
        forward = self.forward_net.layer_outputs(x, lengths)[:depth]
        reversed_out = self.backward_net.layer_outputs(reverse_padded(x, lengths), lengths)[:depth]
        backward = [reverse_padded(y, lengths) for y in reversed_out]
        return forward, backward

    def contextualize(self, x: Tensor, lengths: Tensor, num_layers: int | None = None) -> EncoderOutput:
        """``x (B, T, F)`` -> ``EncoderOutput`` with ``hidden (B, T, 2C)``: layer ``i`` is
        ``[forward_i; backward_i]`` per frame."""
        forward, backward = self.directions(x, lengths, num_layers)
        layers = [torch.cat([f, b], dim=-1) for f, b in zip(forward, backward)]  # (B, T, 2C)
        return EncoderOutput(hidden=layers[-1], lengths=lengths, layers=layers, frame_rate=self.frame_rate)


def build_apc_encoder(
    dim: int = 512,
    num_layers: int = 3,
    num_mel_bins: int = 80,
    dropout: float = 0.0,
    residual: bool = True,
    quantizers: dict[int, GumbelProductQuantizer] | None = None,
) -> CPCEncoder:
    """APC's encoder; defaults are APC's (80-d log mels, three 512-unit LSTM layers with
    residual connections). ``extract`` gives ``x = raw =`` the running-normalised log mels
    ``(B, T, F)``; ``contextualize`` every LSTM layer's output ``(B, T, C)``.

    APC's log mels are normalised per speaker (Chung et al. 2019, experimental setup: zero
    mean and unit variance per speaker), which a single clip cannot give; per-utterance
    statistics would let every frame depend on the whole clip, later audio included, so the
    statistics here are running ones over the frames read so far. ``quantizers`` (VQ-APC): layer
    index -> a quantizer on that layer's output (``QuantizedRecurrentContext``)."""
    if quantizers:
        context: RecurrentContext = QuantizedRecurrentContext(
            num_mel_bins, dim, num_layers, quantizers, cell="lstm", dropout=dropout, residual=residual
        )
    else:
        context = RecurrentContext(
            num_mel_bins, dim, num_layers, cell="lstm", dropout=dropout, residual=residual
        )
    return CPCEncoder(LogMelFrontend(num_mel_bins, normalize="running"), context)


def build_bilstm_encoder(
    dim: int = 1024, num_layers: int = 4, num_mel_bins: int = 80, dropout: float = 0.0
) -> BiRecurrentEncoder:
    """DeCoAR's encoder; defaults are DeCoAR's released model (80-d log mels, four LSTM layers
    of 1024 units in each direction)."""

    def stack() -> RecurrentContext:
        return RecurrentContext(num_mel_bins, dim, num_layers, cell="lstm", dropout=dropout)

    return BiRecurrentEncoder(LogMelFrontend(num_mel_bins), stack(), stack())
