"""Masked reconstruction of log mel frames: Mockingjay and TERA.

* **Mockingjay** (Liu et al., 2020, "Mockingjay: unsupervised speech representation learning
  with deep bidirectional transformer encoders"): log mel frames, downsampled by stacking
  consecutive frames (factor 1/3, sec. 2.2), plus fixed sinusoidal positions, go through a
  post-LN transformer encoder. 15% of the (stacked) frames are chosen for prediction in
  spans of C = 7 consecutive frames (sec. 2.3); the chosen frames of an utterance are all
  zeroed 80% of the time, all replaced by other frames of the utterance 10% of the time and
  left unchanged 10% of the time (one draw per utterance, as s3prl's
  ``generate_masked_acoustic_model_data``). A two-layer head (linear, GELU, LayerNorm, linear)
  reconstructs the original frames; the L1 loss covers the chosen frames only.
* **TERA** (Liu, Li and Lee, 2021, "TERA: self-supervised learning of transformer encoder
  representation for speech"): the same model and time alteration, plus *channel alteration*
  (sec. III-B: one block of contiguous mel channels, of a width drawn uniformly in
  ``[0, 20%]`` of the channels, is zeroed over the whole utterance) and *magnitude alteration*
  (sec. III-C: Gaussian noise added to the input; s3prl ``noise_proportion: 0.15`` with
  ``Normal(0, 0.2)``, i.e. scale 0.2). The L1 loss covers every altered element: the chosen
  frames (all channels) and the zeroed channels (all valid frames). With no time and no
  channel alteration it covers every valid frame (denoising only).

Inputs: 80 Kaldi log mel filterbanks with per-utterance mean and variance normalisation
(``mmssl.nn.reconstruction.log_mel``); the Mockingjay paper reads 160-d features (80 log
mels and their deltas), mmssl reads the 80 log mels without deltas. ``stack=3`` gives
Mockingjay's 1/3 downsampling (33.3 Hz); TERA works on the 10 ms frames (``stack=1``, 100 Hz).
Channel alteration acts on mel channels: with stacking, the same channels are zeroed in
every stacked frame.

Differences from s3prl, each deliberate: spans are drawn by ``mmssl.nn.masking.compute_span_mask``
(``floor(0.15 n / 7 + u)`` overlapping spans, at least ``min_masks=1`` per utterance; s3prl
rounds and drops utterances with no span from the batch); the 10% "random" utterances copy,
into each chosen frame ``t``, frame ``(t + shift) mod n`` for one random ``shift`` per
utterance in ``[7, n - 7]`` (``[n // 2, n - n // 2]`` when ``n < 14``), so every chosen span
receives a contiguous stretch of other frames, as s3prl's random spans do; the magnitude
alteration is drawn per utterance, not once per batch.

The alterations are drawn in the data workers (``AlterationHook``, on frame counts from the
frontend's ``FrameSpec``) as small tensors: ``pred_mask (B, T)``, ``alter_mode (B,)``,
``alter_shift (B,)``, ``channel_mask (B, M)``, ``noise_mask (B,)``. ``forward`` computes the
log mels, applies them (``alter``), and draws the same tensors itself on the device when the
batch has none in training (no alteration in eval mode). No host sync, no boolean indexing.

The encoder (``.encoder``, a ``MaskedReconEncoder`` of ``mmssl.encoders.mockingjay``) is the
stacked log-mel frontend, a linear projection and the transformer with sinusoidal positions,
so ``mmssl extract``, ``mmssl kmeans --checkpoint`` and ``mmssl layers`` read these runs as
any other. Its ``mask`` (what
``mmssl finetune-asr``'s time masking calls) gives masked frames what a zeroed input frame
becomes after the projection, as pretraining zeroes chosen frames; it has no learned mask
embedding.

Shape legend: B batch, S samples, T frames (stacked), K frames per stack, M mel channels,
F = K * M features per stacked frame, C model dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmssl.encoders.mockingjay import MaskedReconEncoder, build_masked_recon_encoder
from mmssl.errors import ConfigError, DataError
from mmssl.nn import transformer as tr
from mmssl.nn.masking import compute_span_mask, hook_generator
from mmssl.nn.outputs import FrameSpec
from mmssl.nn.padding import lengths_to_padding_mask
from mmssl.nn.reconstruction import StackedLogMelFrontend, reconstruction_loss
from mmssl.objectives.base import BatchHook, Objective, check_settings, size_preset
from mmssl.registry import OBJECTIVES

# Mockingjay / TERA base: 3 layers (s3prl TERA ``logMelBase``); large: 12 layers of the same
# width (Mockingjay LARGE, s3prl ``config_model_large``); tiny for tests and the built-in corpus
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(dim=64, num_layers=2, num_heads=4, ffn_dim=128),
    "base": dict(dim=768, num_layers=3, num_heads=12, ffn_dim=3072),
    "large": dict(dim=768, num_layers=12, num_heads=12, ffn_dim=3072),
}


# --- alterations -----------------------------------------------------------------------------

ZERO, RANDOM, KEEP = 0, 1, 2  # ``alter_mode``: what happens to an utterance's chosen frames
ALTERATION_KEYS = ("pred_mask", "alter_mode", "alter_shift", "channel_mask", "noise_mask")


@dataclass(frozen=True)
class AlterationSampler:
    """Draws the alterations of a batch from its frame counts; plain numbers, picklable.

    ``time``: spans of ``span`` frames covering about ``mask_prob`` of the frames (at least
    ``min_masks`` spans), their utterance's frames zeroed with ``zero_prob``, replaced with
    ``random_prob``, else kept. ``channel_fraction > 0``: one block of ``[0, channel_fraction * M]``
    contiguous channels per utterance. ``noise_prob > 0``: each utterance gets noise with that
    probability."""

    num_mel_bins: int = 80
    time: bool = True
    mask_prob: float = 0.15  # Mockingjay, sec. 2.3: 15% of the frames ...
    span: int = 7  # ... in spans of C = 7
    min_masks: int = 1
    zero_prob: float = 0.8  # 80% zeroed, ...
    random_prob: float = 0.1  # ... 10% replaced, 10% kept
    channel_fraction: float = 0.0  # TERA, sec. III-B: up to 20% of the channels
    noise_prob: float = 0.0  # TERA, sec. III-C (s3prl ``noise_proportion: 0.15``)

    def __post_init__(self) -> None:
        if not (
            0.0 <= self.zero_prob and 0.0 <= self.random_prob and self.zero_prob + self.random_prob <= 1.0
        ):
            raise ConfigError(
                f"masked_recon: zero_prob={self.zero_prob} and random_prob={self.random_prob} "
                "must be >= 0 and sum to at most 1"
            )
        if not 0.0 <= self.channel_fraction <= 1.0 or not 0.0 <= self.noise_prob <= 1.0:
            raise ConfigError(
                f"masked_recon: channel_fraction={self.channel_fraction} and "
                f"noise_prob={self.noise_prob} must be in [0, 1]"
            )
        if self.span < 1 or self.min_masks < 0:
            raise ConfigError(
                f"masked_recon: span must be >= 1 and min_masks >= 0; got {self.span}, {self.min_masks}"
            )
        if self.time and not 0.0 < self.mask_prob <= self.span:
            raise ConfigError(
                f"masked_recon: mask_prob must be in (0, span={self.span}]; got {self.mask_prob}"
            )

    @property
    def max_channels(self) -> int:
        """The widest channel block (s3prl: ``int(M * mask_frequency)``)."""
        return int(self.num_mel_bins * self.channel_fraction)

    def __call__(
        self, frames: Tensor, max_len: int, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """``frames (B,)`` valid (stacked) frames, ``max_len`` the padded T -> the alteration
        tensors (see the module docstring), on ``frames.device`` (``generator`` must live there)."""
        device, b = frames.device, frames.shape[0]
        if self.time:
            pred_mask = compute_span_mask(
                frames, max_len, self.mask_prob, self.span, self.min_masks, generator, same_count=False
            )
        else:
            pred_mask = torch.zeros(b, max_len, dtype=torch.bool, device=device)
        dice = torch.rand(b, device=device, generator=generator)
        mode = torch.full((b,), KEEP, dtype=torch.long, device=device)
        mode = torch.where(dice < self.zero_prob + self.random_prob, torch.full_like(mode, RANDOM), mode)
        mode = torch.where(dice < self.zero_prob, torch.full_like(mode, ZERO), mode)
        # a shift in [lo, n - lo], lo = min(span, n // 2): a copied span never overlaps its own
        n = frames.long()
        lo = torch.minimum(torch.full_like(n, self.span), n // 2).clamp(min=1)
        width = (n - 2 * lo + 1).clamp(min=1)
        shift = lo + (torch.rand(b, device=device, generator=generator) * width).long().minimum(width - 1)
        # channel block: width uniform in [0, max_channels], start uniform over every position
        m = self.num_mel_bins
        block = (torch.rand(b, device=device, generator=generator) * (self.max_channels + 1)).long()
        block = block.clamp(max=self.max_channels)
        start = (
            (torch.rand(b, device=device, generator=generator) * (m - block + 1)).long().minimum(m - block)
        )
        channel = torch.arange(m, device=device).unsqueeze(0)  # (1, M)
        channel_mask = (channel >= start.unsqueeze(1)) & (channel < (start + block).unsqueeze(1))  # (B, M)
        noise_mask = torch.rand(b, device=device, generator=generator) < self.noise_prob
        return {
            "pred_mask": pred_mask,
            "alter_mode": mode,
            "alter_shift": shift,
            "channel_mask": channel_mask,
            "noise_mask": noise_mask,
        }


@dataclass
class AlterationHook:
    """Batch hook: adds the alteration tensors of ``sampler`` to a collated batch, on the frame
    counts ``frame_spec`` gives for ``audio_lens`` and the padded width of ``audio``. Draws
    from ``hook_generator(seed)`` only, so a batch's alterations depend on its position alone."""

    frame_spec: FrameSpec
    sampler: AlterationSampler
    seed: int = 0

    def __call__(self, batch: dict) -> dict:
        frames = self.frame_spec(batch["audio_lens"]).cpu()
        max_len = int(self.frame_spec(torch.tensor(batch["audio"].shape[1])))
        batch.update(self.sampler(frames, max_len, hook_generator(self.seed)))
        return batch


def alter(x: Tensor, lengths: Tensor, alterations: dict[str, Tensor], stack: int, noise_std: float) -> Tensor:
    """The altered input: ``x (B, T, F = K * M)`` stacked frames, ``lengths (B,)`` ->
    ``(B, T, F)``. Chosen frames of a ``ZERO`` utterance become 0; those of a ``RANDOM``
    utterance take frame ``(t + alter_shift) mod n``; the channels of ``channel_mask`` are
    zeroed in every stacked frame; utterances of ``noise_mask`` get ``noise_std`` Gaussian
    noise. Padding stays zero."""
    b, t, f = x.shape
    pred_mask, mode = alterations["pred_mask"], alterations["alter_mode"]
    steps = torch.arange(t, device=x.device).unsqueeze(0)  # (1, T)
    shifted = (steps + alterations["alter_shift"].unsqueeze(1)) % lengths.clamp(min=1).unsqueeze(1)  # (B, T)
    replace = pred_mask & (mode == RANDOM).unsqueeze(1)
    source = torch.where(replace, shifted, steps.expand(b, t))
    out = x.gather(1, source.unsqueeze(-1).expand(b, t, f))
    out = out.masked_fill((pred_mask & (mode == ZERO).unsqueeze(1)).unsqueeze(-1), 0.0)
    channels = alterations["channel_mask"].repeat(1, stack)  # (B, F): stacked frames are K copies of M
    out = out.masked_fill(channels.unsqueeze(1), 0.0)
    if noise_std > 0:
        noisy = alterations["noise_mask"].to(out.dtype)[:, None, None]
        out = out + noise_std * noisy * torch.randn_like(out)
    valid = ~lengths_to_padding_mask(lengths, t)
    return out * valid.unsqueeze(-1).to(out.dtype)


def loss_weight(
    alterations: dict[str, Tensor] | None,
    mel_lens: Tensor,
    frames: int,
    stack: int,
    num_mel_bins: int,
    reconstruct_all: bool,
) -> Tensor:
    """Which elements of the stacked target ``(B, T, F)`` the loss reads (bool): the chosen
    frames and the zeroed channels, never a 100 Hz frame past an utterance's end (the zero
    frames that pad its last stack included). Every valid element with ``reconstruct_all`` or
    when ``alterations`` is None."""
    b = mel_lens.shape[0]
    sub = torch.arange(frames * stack, device=mel_lens.device).view(1, frames, stack)
    valid = (sub < mel_lens.view(b, 1, 1)).unsqueeze(-1)  # (B, T, K, 1)
    if alterations is None or reconstruct_all:
        weight = valid.expand(b, frames, stack, num_mel_bins)
    else:
        time = alterations["pred_mask"][:, :, None, None]  # (B, T, 1, 1)
        channel = alterations["channel_mask"][:, None, None, :]  # (B, 1, 1, M)
        weight = (time | channel) & valid  # (B, T, K, M)
    return weight.reshape(b, frames, stack * num_mel_bins)


def weighted_reconstruction(pred: Tensor, target: Tensor, weight: Tensor, kind: str = "l1") -> Tensor:
    """Mean L1 (``kind="l1"``) or squared error (``"mse"``) over the elements of
    ``pred``, ``target (B, T, F)`` where ``weight (B, T, F)`` is True (0 when none is):
    ``mmssl.nn.reconstruction``'s frame-weighted losses, with every element as one frame."""
    b = pred.shape[0]
    return reconstruction_loss(kind)(pred.reshape(b, -1, 1), target.reshape(b, -1, 1), weight.reshape(b, -1))


# --- objective -------------------------------------------------------------------------------


class ReconstructionHead(nn.Module):
    """Mockingjay's prediction head (s3prl ``TransformerSpecPredictionHead``): linear, GELU,
    LayerNorm, linear to the stacked frame. ``(B, T, C)`` -> ``(B, T, F)``."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, out_dim)
        tr.bert_init(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.norm(F.gelu(self.dense(x))))


class MaskedReconstruction(Objective):
    """``forward(batch)`` reads ``audio (B, S)``, ``audio_lens (B,)`` and, from the batch hook,
    the alteration tensors (``ALTERATION_KEYS``). Parts: ``encoder`` (a ``MaskedReconEncoder``
    on a ``StackedLogMelFrontend``), ``head``, ``sampler``. Outputs ``loss`` (the reconstruction
    loss), ``reconstruction_loss`` and the fractions of frames chosen and of elements read."""

    modalities = ("audio",)

    def __init__(
        self,
        encoder: MaskedReconEncoder,
        head: ReconstructionHead,
        sampler: AlterationSampler,
        noise_std: float = 0.2,
        loss: str = "l1",
        seed: int = 0,
    ) -> None:
        super().__init__()
        frontend = encoder.frontend
        if not isinstance(frontend, StackedLogMelFrontend):
            raise ConfigError("masked_recon: the encoder must read a StackedLogMelFrontend")
        if frontend.num_mel_bins != sampler.num_mel_bins:
            raise ConfigError(
                f"masked_recon: the sampler draws {sampler.num_mel_bins} channels, "
                f"the frontend has {frontend.num_mel_bins}"
            )
        self.encoder, self.head, self.sampler = encoder, head, sampler
        self.noise_std, self.seed = noise_std, seed
        reconstruction_loss(loss)  # an unknown name is a ConfigError now, not at the first step
        self.loss_kind = loss
        # both alterations off: the loss covers every valid frame (s3prl's all-ones label)
        self.reconstruct_all = not sampler.time and sampler.max_channels == 0

    def batch_hook(self) -> BatchHook:
        return AlterationHook(self.encoder.frame_spec, self.sampler, self.seed)

    def _alterations(self, batch: dict, lengths: Tensor, frames: int) -> dict[str, Tensor] | None:
        """The hook's tensors (checked against the encoder's frames), else drawn here on the
        device in training, else None (eval mode: no alteration)."""
        if "pred_mask" not in batch:
            return self.sampler(lengths, frames) if self.training else None
        missing = [k for k in ALTERATION_KEYS if k not in batch]
        if missing:
            raise DataError(f"masked_recon: the batch has 'pred_mask' but no {', '.join(missing)}")
        b, m = lengths.shape[0], self.sampler.num_mel_bins
        for key, shape in (
            ("pred_mask", (b, frames)),
            ("channel_mask", (b, m)),
            ("alter_mode", (b,)),
            ("alter_shift", (b,)),
            ("noise_mask", (b,)),
        ):
            if tuple(batch[key].shape) != shape:
                raise DataError(
                    f"batch {key!r} has shape {tuple(batch[key].shape)} but the encoder gives "
                    f"{shape}: the alteration hook and the encoder disagree"
                )
        out = {k: batch[k].to(lengths.device, non_blocking=True) for k in ALTERATION_KEYS}
        out["pred_mask"] = out["pred_mask"] & ~lengths_to_padding_mask(lengths, frames)
        return out

    def forward(self, batch: dict) -> dict[str, Tensor]:
        frontend: StackedLogMelFrontend = self.encoder.frontend  # type: ignore[assignment]
        mels, mel_lens = frontend.mels(batch["audio"], batch["audio_lens"])
        target, lengths = frontend.stacked(mels, mel_lens)  # (B, T, F)
        b, t, _ = target.shape
        alterations = self._alterations(batch, lengths, t)
        x = (
            target
            if alterations is None
            else alter(target, lengths, alterations, frontend.stack, self.noise_std)
        )
        hidden = self.encoder.contextualize(self.encoder.projection(x), lengths).hidden
        pred = self.head(hidden)  # (B, T, F)
        weight = loss_weight(
            alterations, mel_lens, t, frontend.stack, frontend.num_mel_bins, self.reconstruct_all
        )
        loss = weighted_reconstruction(pred, target, weight, self.loss_kind)
        valid = ~lengths_to_padding_mask(lengths, t)
        chosen = torch.zeros_like(valid) if alterations is None else alterations["pred_mask"]
        return {
            "loss": loss,
            "reconstruction_loss": loss.detach(),
            "mask_fraction": chosen.sum().float() / valid.sum().clamp(min=1).float(),
            # of the valid (100 Hz frame, channel) elements, the share the loss reads
            "loss_element_fraction": weight.sum().float()
            / (mel_lens.sum().clamp(min=1) * frontend.num_mel_bins).float(),
        }


@OBJECTIVES.register
def masked_recon(
    size: str = "base",
    stack: int = 3,  # Mockingjay, sec. 2.2: downsampling by 3; TERA: 1
    num_mel_bins: int = 80,
    time_alteration: bool = True,
    mask_prob: float = 0.15,  # Mockingjay, sec. 2.3 / TERA, sec. III-A: 15% of the frames ...
    mask_span: int = 7,  # ... in spans of C = 7 consecutive frames
    min_masks: int = 1,
    zero_prob: float = 0.8,  # chosen frames: 80% zeroed, 10% random frames, 10% unchanged
    random_prob: float = 0.1,
    channel_alteration: bool = False,
    channel_fraction: float = 0.2,  # TERA, sec. III-B: block width up to 20% of the channels
    magnitude_alteration: bool = False,
    noise_prob: float = 0.15,  # TERA, sec. III-C (s3prl ``noise_proportion: 0.15``) ...
    noise_std: float = 0.2,  # ... Gaussian noise of scale 0.2 (s3prl ``Normal(0, 0.2)``)
    loss: str = "l1",  # L1 reconstruction (Mockingjay, sec. 2.3; TERA, sec. III)
    seed: int = 0,
    encoder: dict[str, Any] | None = None,
) -> MaskedReconstruction:
    """Mockingjay (time alteration only) or TERA (time + channel + magnitude) on the
    ``size`` preset (``tiny``, ``base``: 3 layers, ``large``: 12 layers); ``encoder`` holds
    overrides of ``build_masked_recon_encoder``'s arguments."""
    check_settings(
        "masked_recon",
        {"mask_span": mask_span, "min_masks": min_masks, "stack": stack},
        minimum={"mask_span": 1, "min_masks": 0, "stack": 1},
    )
    if time_alteration and not 0.0 < mask_prob <= mask_span:
        raise ConfigError(
            f"masked_recon: objective.mask_prob must be in (0, objective.mask_span={mask_span}]; "
            f"got {mask_prob}"
        )
    options = {
        **size_preset("masked_recon", size, SIZES),
        "stack": stack,
        "num_mel_bins": num_mel_bins,
        **(encoder or {}),
    }
    try:
        enc = build_masked_recon_encoder(**options)
    except TypeError as err:
        raise ConfigError(f"masked_recon: objective.encoder: {err}") from None
    sampler = AlterationSampler(
        num_mel_bins=num_mel_bins,
        time=time_alteration,
        mask_prob=mask_prob,
        span=mask_span,
        min_masks=min_masks,
        zero_prob=zero_prob,
        random_prob=random_prob,
        channel_fraction=channel_fraction if channel_alteration else 0.0,
        noise_prob=noise_prob if magnitude_alteration else 0.0,
    )
    head = ReconstructionHead(enc.dim, enc.feature_dim)
    return MaskedReconstruction(
        enc, head, sampler, noise_std=noise_std if magnitude_alteration else 0.0, loss=loss, seed=seed
    )
