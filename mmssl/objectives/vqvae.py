"""Frame autoencoders of log mel filterbanks: a plain bottleneck (``autoencoder``) and a vector
quantised one (``vqvae``; van den Oord et al., 2017, "Neural discrete representation
learning"; for speech, Chorowski et al., 2019, "Unsupervised speech representation learning
using WaveNet autoencoders").

* Encoder (``FrameAutoencoderEncoder``, ``mmssl.encoders.autoencoder``): normalised 80-d log
  mels (100 Hz), optionally downsampled x2 by stacking frame pairs (50 Hz; Chorowski et al.
  downsample their encoder to 50 Hz with a strided convolution), a convolution of kernel 3
  and residual blocks (ReLU, conv 3, ReLU, conv 1, plus the input: van den Oord et al.,
  sec. 4.1), and a linear projection to the latent ``z_e``.
* Bottleneck: ``z_e`` as it is (``autoencoder``) or its nearest codebook entry with a
  straight-through gradient (``vqvae``: ``mmssl.nn.quantizer.VectorQuantizer``, K = 512,
  beta = 0.25, EMA codebook with decay 0.99 and dead-entry restarts by default).
* Decoder (``FrameDecoder``): linear projection, residual blocks and a linear layer to
  ``stack`` mel frames per latent frame. The original decoders are autoregressive (PixelCNN,
  WaveNet); this one reconstructs the log mels frame-wise, which keeps all of the information
  in the latents (the point of the representation) and trains in one pass.

The reconstruction term is the mean squared error by default: VQ-VAE's ``log p(x | z_q)``
(eq. 3) under a Gaussian decoder of fixed variance is, up to constants, the squared error;
``reconstruction="l1"`` uses the L1 distance of APC and DeCoAR instead. The VQ-VAE loss adds
``||sg[z_e] - e||^2 + beta ||z_e - sg[e]||^2`` (eq. 3; the first term replaced by the EMA
updates when they are on).

Every convolution's output is zeroed on padded frames before the next layer, so a padded
batch gives each utterance what it gets alone (the zero padding of a convolution at an
utterance's end is what the padded frames hold). The encoder's layers for downstream use are
the convolution stack's outputs, ``z_e`` and, for VQ-VAE, the quantised ``z_q``. The encoder
has no ``mask``: fine-tuning masks (``mmssl finetune-asr``'s time masking) are not applied to
autoencoder and VQ-VAE encoders.

Shape legend: B batch, S samples, T frames (latent rate), F mel bins, C channels, D latent
dim, K codebook entries.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from mmssl.encoders.autoencoder import ConvStack, FrameAutoencoderEncoder, ResidualBlock, padding_keep
from mmssl.errors import ConfigError
from mmssl.nn.padding import lengths_to_padding_mask
from mmssl.nn.quantizer import VectorQuantizer
from mmssl.nn.reconstruction import LogMelFrontend, StackedLogMelFrontend, reconstruction_loss
from mmssl.objectives.base import Objective, check_settings, size_preset
from mmssl.registry import OBJECTIVES


class FrameDecoder(nn.Module):
    """Linear ``D -> C``, residual blocks, linear ``C -> stack * F``, unstacked:
    ``z (B, T, D)``, ``lengths (B,)`` -> ``(B, stack * T, F)``."""

    def __init__(
        self, latent_dim: int, channels: int, num_blocks: int, num_mel_bins: int, stack: int
    ) -> None:
        super().__init__()
        self.stack, self.num_mel_bins = stack, num_mel_bins
        self.from_latent = nn.Linear(latent_dim, channels)
        self.blocks = nn.ModuleList(ResidualBlock(channels) for _ in range(num_blocks))
        self.out = nn.Linear(channels, stack * num_mel_bins)

    def forward(self, z: Tensor, lengths: Tensor) -> Tensor:
        b, t, _ = z.shape
        keep = padding_keep(lengths, t)  # (B, 1, T)
        h = self.from_latent(z).transpose(1, 2) * keep  # (B, C, T)
        for block in self.blocks:
            h = block(h, keep)
        y = self.out(F.relu(h).transpose(1, 2))  # (B, T, stack * F)
        return y.reshape(b, t * self.stack, self.num_mel_bins)  # (B, stack * T, F)


class FrameAutoencoderObjective(Objective):
    """``forward(batch)`` reads ``audio (B, S)``, ``audio_lens (B,)``. Parts: ``encoder`` (a
    ``FrameAutoencoderEncoder``, with a quantizer for VQ-VAE) and ``decoder``."""

    modalities = ("audio",)

    def __init__(
        self, encoder: FrameAutoencoderEncoder, decoder: FrameDecoder, reconstruction: str = "mse"
    ) -> None:
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.reconstruction, self.reconstruction_loss = reconstruction, reconstruction_loss(reconstruction)

    def forward(self, batch: dict) -> dict[str, Tensor]:
        enc = self.encoder
        mels, mel_lens = enc.frontend.mels(batch["audio"], batch["audio_lens"])  # (B, T_mel, F)
        x, lengths = enc.frontend.stacked(mels, mel_lens)  # (B, T, stack * F)
        b, t, _ = x.shape
        _, z_e = enc.encode(x, lengths)
        vq = enc.quantizer(z_e, lengths) if enc.quantizer is not None else None
        recon = self.decoder(z_e if vq is None else vq.quantized, lengths)  # (B, stack * T, F)
        target = x.reshape(b, t * enc.stack, enc.frontend.num_mel_bins)  # the mel frames, zero padded
        weight = ~lengths_to_padding_mask(mel_lens, t * enc.stack)  # only real mel frames
        rec = self.reconstruction_loss(recon, target, weight)
        out = {f"reconstruction_{self.reconstruction}_loss": rec.detach()}
        if vq is None:
            return {"loss": rec, **out}
        return {
            "loss": rec + vq.loss,
            **out,
            "codebook_loss": vq.codebook_loss,
            "commitment_loss": vq.commitment_loss,
            "code_perplexity": vq.perplexity.detach(),
            "code_usage": vq.usage.detach(),
        }


# channels / residual blocks / latent dim per size; base follows Chorowski et al. (768-channel
# convolutions, 64-dimensional latents), large is a wider, deeper variant
SIZES: dict[str, dict[str, int]] = {
    "tiny": {"channels": 32, "num_blocks": 1, "latent_dim": 16},
    "base": {"channels": 768, "num_blocks": 4, "latent_dim": 64},
    "large": {"channels": 1024, "num_blocks": 6, "latent_dim": 64},
}
ENCODER_KEYS = ("channels", "num_blocks", "latent_dim", "num_mel_bins")


def build_frame_autoencoder(
    size: str,
    downsample: bool,
    reconstruction: str,
    overrides: dict[str, Any] | None,
    quantizer: dict[str, Any] | None,
) -> FrameAutoencoderObjective:
    """Encoder, optional ``VectorQuantizer(**quantizer)`` and decoder of the ``size`` preset;
    ``overrides`` may set ``channels``, ``num_blocks``, ``latent_dim``, ``num_mel_bins``."""
    what = "vqvae" if quantizer is not None else "autoencoder"
    settings = {**size_preset(what, size, SIZES), "num_mel_bins": 80, **(overrides or {})}
    unknown = sorted(set(settings) - set(ENCODER_KEYS))
    if unknown:
        raise ConfigError(f"objective.encoder: unknown key {unknown[0]!r}; known: {', '.join(ENCODER_KEYS)}")
    check_settings(
        what, settings, overrides, {"channels": 1, "num_blocks": 0, "latent_dim": 1, "num_mel_bins": 1}
    )
    stack = 2 if downsample else 1
    mels, channels, blocks, latent = (
        settings[k] for k in ("num_mel_bins", "channels", "num_blocks", "latent_dim")
    )
    vq = VectorQuantizer(latent, **quantizer) if quantizer is not None else None
    convs = ConvStack(mels * stack, channels, blocks)
    encoder = FrameAutoencoderEncoder(StackedLogMelFrontend(LogMelFrontend(mels), stack), convs, latent, vq)
    decoder = FrameDecoder(latent, channels, blocks, mels, stack)
    return FrameAutoencoderObjective(encoder, decoder, reconstruction)


@OBJECTIVES.register
def autoencoder(
    size: str = "base",
    downsample: bool = True,  # 50 Hz latents, as Chorowski et al.
    reconstruction: str = "mse",  # Gaussian log-likelihood up to constants; or "l1"
    encoder: dict[str, Any] | None = None,
) -> FrameAutoencoderObjective:
    """A log-mel autoencoder with a continuous bottleneck (the baseline of Chorowski et al.)."""
    return build_frame_autoencoder(size, downsample, reconstruction, encoder, None)


@OBJECTIVES.register
def vqvae(
    size: str = "base",
    entries: int = 512,  # K = 512 (van den Oord et al., sec. 4.1)
    beta: float = 0.25,  # commitment weight (sec. 3.2)
    ema_decay: float | None = 0.99,  # EMA codebook (appendix A.1); null: codebook loss instead
    restart_threshold: float = 1.0,  # restart entries picked < once per update on average; 0: off
    downsample: bool = True,
    reconstruction: str = "mse",
    encoder: dict[str, Any] | None = None,
    world_size: int = 1,
) -> FrameAutoencoderObjective:
    """VQ-VAE on log mels; ``world_size`` keeps the EMA codebook the same on every rank."""
    for key, value in (("beta", beta), ("restart_threshold", restart_threshold)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ConfigError(f"vqvae: objective.{key} must be a number >= 0; got {value!r}")
    quantizer = {
        "entries": entries,
        "beta": beta,
        "ema_decay": ema_decay,
        "restart_threshold": restart_threshold,
        "world_size": world_size,
    }
    return build_frame_autoencoder(size, downsample, reconstruction, encoder, quantizer)
