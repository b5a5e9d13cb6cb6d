"""Frame autoencoders of log mel filterbanks: a plain bottleneck (``autoencoder``), a vector
quantised one (``vqvae``; van den Oord et al., 2017, "Neural discrete representation
learning"; for speech, Chorowski et al., 2019, "Unsupervised speech representation learning
using WaveNet autoencoders") and a denoising one (``denoising_autoencoder``; Vincent et al.,
2008, "Extracting and composing robust features with denoising autoencoders"; on speech
spectra, Lu et al., 2013, "Speech enhancement based on deep denoising autoencoder").

* Denoising: the encoder reads the log mels of a noisy copy of the waveform and the decoder
  reconstructs the log mels of the clean one, so the code keeps the speech and drops the noise.
  The noisy copy (``noisy_audio (B, S)``, made by the batch hook :class:`NoisyCopy` in the data
  workers) is mixed as ``mmssl.data.noise.AddNoise`` does, before any feature is computed:
  noise from a folder (``noise_dir``; ``mmssl synth`` writes ``noise/train``), or Gaussian white
  noise without one, at an RMS SNR drawn uniformly in ``noise_snr`` dB, with probability
  ``noise_prob`` per utterance (an utterance left clean is plain autoencoding). Each copy is
  normalised by its own statistics (utterance mean and variance), as every input is.

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

from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from mmssl.data.noise import AddNoise, NoiseBank, WhiteNoise, snr_range
from mmssl.encoders.autoencoder import ConvStack, FrameAutoencoderEncoder, ResidualBlock, padding_keep
from mmssl.errors import ConfigError
from mmssl.nn.masking import hook_generator
from mmssl.nn.padding import lengths_to_padding_mask
from mmssl.nn.quantizer import VectorQuantizer
from mmssl.nn.reconstruction import LogMelFrontend, StackedLogMelFrontend, reconstruction_loss
from mmssl.objectives.base import BatchHook, Objective, check_settings, size_preset
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


@dataclass
class Reconstruction:
    """What :meth:`FrameAutoencoderObjective.reconstruct` gives: ``recon (B, T_mel, F)``, the
    ``target`` log mels (zero padded), ``weight (B, T_mel)`` (True on real mel frames), the
    latents ``z_e (B, T, D)`` over ``lengths (B,)`` latent frames, and the quantizer's output
    (None without one)."""

    recon: Tensor
    target: Tensor
    weight: Tensor
    z_e: Tensor
    lengths: Tensor
    vq: Any = None


@dataclass
class NoisyCopy:
    """Picklable batch hook: ``noisy_audio (B, S)``, each utterance's valid waveform through
    ``add`` (noise at an SNR drawn in its range, with its probability); padding stays zero and
    ``audio`` stays clean (the target). Draws from ``hook_generator(seed)``."""

    add: AddNoise
    seed: int = 0

    def __call__(self, batch: dict) -> dict:
        g = hook_generator(self.seed)
        audio = batch["audio"].cpu()
        noisy = audio.clone()
        for i, n in enumerate(batch["audio_lens"].tolist()):
            noisy[i, :n] = self.add(audio[i, :n], g)
        batch["noisy_audio"] = noisy.to(batch["audio"].device)
        return batch


class FrameAutoencoderObjective(Objective):
    """``forward(batch)`` reads ``audio (B, S)``, ``audio_lens (B,)`` and, when denoising,
    ``noisy_audio (B, S)`` (made by ``noise``, the batch hook, when absent). Parts: ``encoder``
    (a ``FrameAutoencoderEncoder``, with a quantizer for VQ-VAE), ``decoder``, and ``noise``
    (a :class:`NoisyCopy`) for the denoising autoencoder."""

    modalities = ("audio",)

    def __init__(
        self,
        encoder: FrameAutoencoderEncoder,
        decoder: FrameDecoder,
        reconstruction: str = "mse",
        noise: NoisyCopy | None = None,
    ) -> None:
        super().__init__()
        self.encoder, self.decoder, self.noise = encoder, decoder, noise
        self.reconstruction, self.reconstruction_loss = reconstruction, reconstruction_loss(reconstruction)

    def batch_hook(self) -> BatchHook | None:
        return self.noise

    def reconstruct(self, audio: Tensor, target_audio: Tensor, audio_lens: Tensor) -> Reconstruction:
        """Encode the log mels of ``audio (B, S)``, decode, and take the log mels of
        ``target_audio (B, S)`` (the same utterances, e.g. clean where ``audio`` is noisy) as
        the target."""
        enc = self.encoder
        mels, mel_lens = enc.frontend.mels(audio, audio_lens)  # (B, T_mel, F)
        x, lengths = enc.frontend.stacked(mels, mel_lens)  # (B, T, stack * F)
        if target_audio is not audio:
            target_mels, _ = enc.frontend.mels(target_audio, audio_lens)
            target_x, _ = enc.frontend.stacked(target_mels, mel_lens)  # (B, T, stack * F)
        else:
            target_x = x
        b, t, _ = x.shape
        _, z_e = enc.encode(x, lengths)
        vq = enc.quantizer(z_e, lengths) if enc.quantizer is not None else None
        recon = self.decoder(z_e if vq is None else vq.quantized, lengths)  # (B, stack * T, F)
        target = target_x.reshape(b, t * enc.stack, enc.frontend.num_mel_bins)  # mel frames, zero padded
        weight = ~lengths_to_padding_mask(mel_lens, t * enc.stack)  # only real mel frames
        return Reconstruction(recon, target, weight, z_e, lengths, vq)

    def forward(self, batch: dict) -> dict[str, Tensor]:
        audio = batch["audio"]
        if self.noise is not None:
            if "noisy_audio" not in batch:
                batch = self.noise(dict(batch))
            audio = batch["noisy_audio"]
        r = self.reconstruct(audio, batch["audio"], batch["audio_lens"])
        vq = r.vq
        rec = self.reconstruction_loss(r.recon, r.target, r.weight)
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
    noise: NoisyCopy | None = None,
) -> FrameAutoencoderObjective:
    """Encoder, optional ``VectorQuantizer(**quantizer)`` and decoder of the ``size`` preset;
    ``overrides`` may set ``channels``, ``num_blocks``, ``latent_dim``, ``num_mel_bins``;
    ``noise``: the noisy copy of a denoising autoencoder."""
    what = "vqvae" if quantizer is not None else "denoising_autoencoder" if noise else "autoencoder"
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
    return FrameAutoencoderObjective(encoder, decoder, reconstruction, noise)


@OBJECTIVES.register
def autoencoder(
    size: str = "base",
    downsample: bool = True,  # 50 Hz latents, as Chorowski et al.
    reconstruction: str = "mse",  # Gaussian log-likelihood up to constants; or "l1"
    encoder: dict[str, Any] | None = None,
) -> FrameAutoencoderObjective:
    """A log-mel autoencoder with a continuous bottleneck (the baseline of Chorowski et al.)."""
    return build_frame_autoencoder(size, downsample, reconstruction, encoder, None)


@OBJECTIVES.register(train_data=("noise_dir",))
def denoising_autoencoder(
    size: str = "base",
    noise_dir: str | None = None,  # a folder of noise recordings; None: Gaussian white noise
    noise_prob: float = 1.0,  # every utterance gets its noisy copy
    noise_snr: float | list[float] = (0.0, 20.0),  # dB, uniform in [low, high] (AddNoise's default range)
    downsample: bool = True,
    reconstruction: str = "mse",
    encoder: dict[str, Any] | None = None,
) -> FrameAutoencoderObjective:
    """The autoencoder of :func:`autoencoder`, reading a noisy copy of the audio and
    reconstructing the clean log mels (Vincent et al., 2008; Lu et al., 2013)."""
    if isinstance(noise_prob, bool) or not isinstance(noise_prob, (int, float)) or not 0 <= noise_prob <= 1:
        raise ConfigError(
            f"denoising_autoencoder: objective.noise_prob must be in [0, 1]; got {noise_prob!r}"
        )
    low, high = snr_range(noise_snr)
    if low > high:
        raise ConfigError(f"denoising_autoencoder: objective.noise_snr [{low:g}, {high:g}] has low > high")
    bank = NoiseBank(noise_dir) if noise_dir else WhiteNoise()
    noise = NoisyCopy(AddNoise(bank, float(noise_prob), (low, high)))
    return build_frame_autoencoder(size, downsample, reconstruction, encoder, None, noise)


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
