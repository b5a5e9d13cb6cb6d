"""The encoder of the frame autoencoders (``autoencoder`` and ``vqvae`` of
``mmssl.objectives.vqvae``): normalised log mels, optionally stacked in frame pairs, a
convolution of kernel 3 and residual blocks (van den Oord et al., 2017, sec. 4.1), a linear
projection to the latent ``z_e`` and, for VQ-VAE, the codebook. Every convolution's output is
zeroed on padded frames before the next layer, so a padded batch gives each utterance what it
gets alone.

Shape legend: B batch, S samples, T frames (latent rate), F mel bins, C channels, D latent dim.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from mmssl.encoders.base import EncoderOutput, Features, SpeechEncoder, check_depth
from mmssl.nn.padding import lengths_to_padding_mask
from mmssl.nn.quantizer import VectorQuantizer
from mmssl.nn.reconstruction import StackedLogMelFrontend


def padding_keep(lengths: Tensor, t: int) -> Tensor:
    """``(B, 1, T)`` float: 1 on valid frames, 0 on padding (channel-first layout)."""
    return (~lengths_to_padding_mask(lengths, t)).unsqueeze(1).float()


class ResidualBlock(nn.Module):
    """``x + conv1(relu(conv3(relu(x))))`` (VQ-VAE, sec. 4.1) on ``x (B, C, T)``."""

    def __init__(self, channels: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or channels
        self.conv3 = nn.Conv1d(channels, hidden, 3, padding=1)
        self.conv1 = nn.Conv1d(hidden, channels, 1)

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        """``x (B, C, T)``, ``keep (B, 1, T)`` -> ``(B, C, T)``, zero on padding."""
        y = self.conv3(F.relu(x)) * keep  # zero padding before the next convolution reads it
        return (x + self.conv1(F.relu(y))) * keep


class ConvStack(nn.Module):
    """Input convolution (kernel 3) then residual blocks: ``x (B, T, F_in)`` -> the output
    ``(B, T, C)`` of every layer, each zero on padded frames."""

    def __init__(self, input_dim: int, channels: int, num_blocks: int) -> None:
        super().__init__()
        self.input = nn.Conv1d(input_dim, channels, 3, padding=1)
        self.blocks = nn.ModuleList(ResidualBlock(channels) for _ in range(num_blocks))

    def forward(self, x: Tensor, lengths: Tensor) -> list[Tensor]:
        keep = padding_keep(lengths, x.shape[1])
        h = self.input(x.transpose(1, 2)) * keep  # (B, C, T)
        outputs = [h]
        for block in self.blocks:
            h = block(h, keep)
            outputs.append(h)
        return [o.transpose(1, 2) for o in outputs]  # each (B, T, C)


class FrameAutoencoderEncoder(SpeechEncoder):
    """Log mels (frame pairs: a ``StackedLogMelFrontend``) -> ``ConvStack`` -> linear
    ``C -> D`` -> optional quantizer.

    ``extract``: ``Features`` with ``x = raw =`` the (stacked) log mels ``(B, T, stack * F)``;
    ``encode``: the convolution layers and ``z_e (B, T, D)``; ``contextualize``: every layer,
    ``z_e`` and (with a quantizer) ``z_q`` in ``layers``, ``hidden`` the last of them."""

    def __init__(
        self,
        frontend: StackedLogMelFrontend,
        convs: ConvStack,
        latent_dim: int,
        quantizer: VectorQuantizer | None = None,
    ) -> None:
        super().__init__()
        self.frontend, self.convs, self.quantizer = frontend, convs, quantizer
        self.to_latent = nn.Linear(convs.input.out_channels, latent_dim)
        self.dim = latent_dim
        self.feature_dim = frontend.out_dim
        self.frame_rate = frontend.frame_rate
        self.frame_spec = frontend.frame_spec

    @property
    def stack(self) -> int:
        """Mel frames per latent frame."""
        return self.frontend.stack

    @property
    def num_layers(self) -> int:
        return 1 + len(self.convs.blocks) + 1 + (self.quantizer is not None)

    def extract(self, audio: Tensor, audio_lens: Tensor) -> Features:
        """``audio (B, S)`` -> ``Features`` with ``x = raw`` ``(B, T, stack * F)``: frame ``t``
        holds mel frames ``stack * t .. stack * t + stack - 1`` (zeros past the end)."""
        x, lengths = self.frontend(audio, audio_lens)
        return Features(x=x, raw=x, lengths=lengths)

    def encode(self, x: Tensor, lengths: Tensor) -> tuple[list[Tensor], Tensor]:
        """``x (B, T, stack * F)`` -> (convolution layers ``[(B, T, C)]``, ``z_e (B, T, D)``),
        all zero on padded frames."""
        layers = self.convs(x, lengths)
        keep = (~lengths_to_padding_mask(lengths, x.shape[1])).unsqueeze(-1).to(x.dtype)
        return layers, self.to_latent(layers[-1]) * keep

    def contextualize(self, x: Tensor, lengths: Tensor, num_layers: int | None = None) -> EncoderOutput:
        """``x (B, T, stack * F)`` -> ``EncoderOutput``: layers ``1..num_layers`` of the convolution
        stack, ``z_e`` and ``z_q``. The codebook never moves here (``VectorQuantizer.lookup``), also
        in training mode (CTC fine-tuning of this encoder keeps the pretrained codebook)."""
        depth = check_depth("frame autoencoder", num_layers, self.num_layers)
        convs, z_e = self.encode(x, lengths)
        layers = [*convs, z_e]
        if self.quantizer is not None:
            layers.append(self.quantizer.lookup(z_e)[0])
        layers = layers[:depth]
        return EncoderOutput(hidden=layers[-1], lengths=lengths, layers=layers, frame_rate=self.frame_rate)
