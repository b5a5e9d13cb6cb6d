"""AV-HuBERT (Shi et al., 2022): masked prediction of cluster targets from audio and lip video.

Each modality is masked on its input to the fusion, with its own span settings (AV-HuBERT
``mask_prob_audio=0.8``, ``mask_length_audio=10``, ``mask_prob_image=0.3``,
``mask_length_image=5``):

* audio: masked frames of the projected filterbank stream take a learned embedding;
* video: masked frames are *replaced by frames from elsewhere in the same clip* (sec. 3.1,
  "segments substituted"), so the model cannot spot the mask from the input. Each masked run
  copies a run of the clip's own valid frames that never overlaps it (AV-HuBERT
  ``selection_type: same_seq``, :func:`substitution_index`).

The fused stream (with modality dropout, :class:`mmssl.encoders.fusion.AVFusion`) goes through
the transformer; the loss is HuBERT's (Hsu et al., 2021, eq. 2-3) over the union of both masks:
cross-entropy of cosine similarities between the projected output and one embedding per
cluster, divided by 0.1. Targets come from ``mmssl kmeans``: MFCC clusters in the first
iteration (100 Hz labels, ``label_rate=100``), then clusters of the previous checkpoint's
audio-visual features (25 Hz labels, ``label_rate=25``; ``mmssl.encoders.av.av_features``).

Noise augmentation (noise-augmented AV-HuBERT, Shi et al., 2022b): in the data workers, with
probability ``noise_prob`` an utterance's waveform gets noise from a folder at an SNR drawn
uniformly in ``snr_range``, before any feature is computed; the targets stay those of the
clean audio.

Shape legend: B batch, S samples, T frames (25 Hz), L labels, C model dim, D projection dim,
V clusters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmssl.data.noise import AddNoise, NoiseBank
from mmssl.encoders.av import AVEncoder, av_base, av_large, av_tiny, substitute_frames
from mmssl.encoders.base import FrameSpec
from mmssl.encoders.fusion import sample_keep
from mmssl.errors import ConfigError, DataError
from mmssl.nn.masking import compute_span_mask, hook_generator
from mmssl.nn.padding import lengths_to_padding_mask
from mmssl.objectives.base import BatchHook, Objective
from mmssl.objectives.hubert import FINAL_DIM, cosine_logits, resample_targets, weighted_cross_entropy
from mmssl.registry import OBJECTIVES


def _runs(mask: Tensor) -> tuple[Tensor, Tensor]:
    """First and one-past-last frame of the contiguous masked run each frame of ``mask (B, T)``
    belongs to: two ``(B, T)`` long tensors (meaningful where ``mask`` is True)."""
    b, t = mask.shape
    steps = torch.arange(t, device=mask.device).expand(b, t)
    before = F.pad(mask[:, :-1], (1, 0), value=False)
    after = F.pad(mask[:, 1:], (0, 1), value=False)
    start = torch.where(mask & ~before, steps, torch.zeros_like(steps)).cummax(dim=1).values
    last = torch.where(mask & ~after, steps, torch.full_like(steps, t))
    end = last.flip(1).cummin(dim=1).values.flip(1) + 1
    return start, end


def substitution_index(mask: Tensor, lengths: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Source frame of every frame for video masking: ``mask (B, T)``, ``lengths (B,)`` ->
    ``(B, T)`` long.

    Unmasked frames map to themselves. Each contiguous masked run ``[s, e)`` (``L = e - s``
    frames) of clip ``b`` copies the run of ``L`` frames starting at ``o``, drawn uniformly
    among the valid frames ``[0, n)`` (``n = lengths[b]``) except ``[max(0, s - L), e)``;
    copied frames past ``n - 1`` repeat frame ``n - 1``. This is AV-HuBERT's ``same_seq``
    selection (``apply_input_mask``): the copied run never overlaps the masked one (it may
    start right after it, as there), but it is drawn over the clip's valid frames where the
    reference draws over the padded length, which can copy padding. Only
    when no start is left (the run reaches the clip's end and starts within ``L`` frames of
    its beginning) the run cycles through the frames before it, and a run covering the whole
    clip keeps its own frames (nothing else to copy; ``compute_span_mask`` never makes one).
    Vectorised (no host sync); ``generator`` must live on ``mask.device``.
    """
    b, t = mask.shape
    steps = torch.arange(t, device=mask.device).expand(b, t)
    n = lengths.to(mask.device).long().clamp(min=1, max=max(t, 1)).unsqueeze(1)  # (B, 1)
    mask = mask & (steps < n)
    start, end = _runs(mask)
    low = (2 * start - end).clamp(min=0)  # max(0, s - L): starts whose copy would touch the run
    left = n - (end - low)  # (B, T) starts left to draw from
    u = torch.rand(b, t, device=mask.device, generator=generator).gather(1, start)  # one draw per run
    k = torch.minimum(torch.floor(u * left.clamp(min=1)).long(), (left - 1).clamp(min=0))
    origin = torch.where(k < low, k, k + (end - low))  # the k-th start outside [low, end)
    source = (origin + steps - start).minimum(n - 1)
    cycled = torch.where(start > 0, (steps - start) % start.clamp(min=1), steps)
    return torch.where(mask, torch.where(left > 0, source, cycled), steps)


@dataclass
class AVMasks:
    """Span masks for both streams over the fused frames, and the video substitution index.

    A picklable batch hook: adds ``audio_mask (B, T)``, ``video_mask (B, T)`` (True = masked,
    ``T`` = the fused frame count, the smaller of both streams' padded counts) and
    ``video_source (B, T_video)`` to a collated batch. ``frame_spec`` counts the audio frames.
    With both streams and ``modality_dropout > 0`` it also draws modality dropout
    (``keep_audio``, ``keep_video`` ``(B,)``), so under DDP each rank's utterances get their own
    draws (the step's global generator is seeded alike on every rank).
    """

    frame_spec: FrameSpec
    audio_prob: float = 0.8
    audio_span: int = 10
    video_prob: float = 0.3
    video_span: int = 5
    min_masks: int = 2
    seed: int = 0
    modality_dropout: float = 0.0
    audio_dropout: float = 0.5

    def generator(self) -> torch.Generator:
        """A fresh CPU generator for one batch, from ``hook_generator(seed)``: a pure function
        of the batch position the batch stream seeded (same masks whatever the worker count,
        and after a resume)."""
        return hook_generator(self.seed)

    def fused_lengths(self, batch: dict) -> tuple[Tensor, int]:
        """Valid fused frames ``(B,)`` and the padded fused count ``T``, from the batch alone."""
        counts, sizes = [], []
        if "audio" in batch:
            counts.append(self.frame_spec(batch["audio_lens"]))
            sizes.append(int(self.frame_spec(torch.tensor(batch["audio"].shape[1]))))
        if "video" in batch:
            counts.append(batch["video_lens"].long())
            sizes.append(batch["video"].shape[1])
        if not counts:
            raise DataError("av_hubert needs audio or video in the batch")
        t = min(sizes)
        lengths = counts[0] if len(counts) == 1 else torch.minimum(counts[0].to(counts[1].device), counts[1])
        return lengths.clamp(max=t), t

    def make(self, batch: dict, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        lengths, t = self.fused_lengths(batch)
        out = {
            "audio_mask": compute_span_mask(lengths, t, self.audio_prob, self.audio_span, self.min_masks, generator),
            "video_mask": compute_span_mask(lengths, t, self.video_prob, self.video_span, self.min_masks, generator),
        }
        if "video" in batch:
            tv = batch["video"].shape[1]
            wide = torch.nn.functional.pad(out["video_mask"], (0, tv - t), value=False)
            out["video_source"] = substitution_index(wide, batch["video_lens"].to(wide.device), generator)
            if "audio" in batch and self.modality_dropout > 0:
                keep = sample_keep(lengths.shape[0], self.modality_dropout, self.audio_dropout, generator)
                out["keep_audio"], out["keep_video"] = keep
        return out

    def __call__(self, batch: dict) -> dict:
        batch.update(self.make({k: (v.cpu() if isinstance(v, Tensor) else v) for k, v in batch.items()}, self.generator()))
        return batch


@dataclass
class NoisyAVMasks:
    """Batch hook: noise on each utterance's valid waveform (``add``), then :class:`AVMasks`."""

    add: AddNoise
    masks: AVMasks

    def __call__(self, batch: dict) -> dict:
        if "audio" in batch:
            g = self.masks.generator()
            audio = batch["audio"].clone()
            for i, n in enumerate(batch["audio_lens"].tolist()):
                audio[i, :n] = self.add(audio[i, :n], g)
            batch["audio"] = audio
        return self.masks(batch)


class AVHubert(Objective):
    """``forward(batch)`` reads ``audio``/``audio_lens`` and/or ``video``/``video_lens``,
    ``targets (B, L)`` and, from the batch hook, ``audio_mask``, ``video_mask``,
    ``video_source`` (made here when absent). Parts: ``encoder``, ``masks``, optional ``noise``."""

    modalities = ("audio", "video")

    def __init__(
        self,
        encoder: AVEncoder,
        masks: AVMasks,
        num_classes: int,
        final_dim: int,
        label_rate: float,
        temperature: float = 0.1,
        unmasked_weight: float = 0.0,
        noise: AddNoise | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ConfigError(f"av_hubert: num_classes must be >= 2, got {num_classes}")
        self.encoder, self.masks, self.noise = encoder, masks, noise
        self.final_proj = nn.Linear(encoder.dim, final_dim)
        self.label_embeddings = nn.Parameter(torch.empty(num_classes, final_dim).uniform_())
        self.num_classes, self.label_rate = num_classes, label_rate
        self.temperature, self.unmasked_weight = temperature, unmasked_weight

    def batch_hook(self) -> BatchHook:
        return self.masks if self.noise is None else NoisyAVMasks(self.noise, self.masks)

    def _batch_masks(self, batch: dict, lengths: Tensor, t: int) -> dict[str, Tensor]:
        keys = ("audio_mask", "video_mask") + (("video_source",) if "video" in batch else ())
        if all(k in batch for k in keys):
            keys += tuple(k for k in ("keep_audio", "keep_video") if k in batch)
            made = {k: batch[k].to(lengths.device, non_blocking=True) for k in keys}
        else:
            made = self.masks.make(batch)
        for key in ("audio_mask", "video_mask"):
            if made[key].shape != (lengths.shape[0], t):
                raise DataError(
                    f"batch {key!r} has shape {tuple(made[key].shape)} but the encoder gives "
                    f"({lengths.shape[0]}, {t}) fused frames: the mask hook and the encoder disagree"
                )
        return made

    def forward(self, batch: dict) -> dict[str, Tensor]:
        if "targets" not in batch:
            raise DataError("the batch has no 'targets': set data.labels to a `mmssl kmeans` output folder")
        enc = self.encoder
        lengths, t = self.masks.fused_lengths(batch)
        masks = self._batch_masks(batch, lengths, t)
        a = a_lens = v = v_lens = None
        if "audio" in batch:
            a, _, a_lens = enc.audio_features(batch["audio"], batch["audio_lens"])
            a_mask = torch.nn.functional.pad(masks["audio_mask"], (0, a.shape[1] - t), value=False)
            a = enc.mask_audio(a, a_mask)
        if "video" in batch:
            video = substitute_frames(batch["video"], masks["video_source"])
            v, v_lens = enc.video_features(video, batch["video_lens"])
        keep = (masks["keep_audio"], masks["keep_video"]) if self.training and "keep_audio" in masks else None
        x, lengths = enc.fuse(a, a_lens, v, v_lens, keep)
        valid = ~lengths_to_padding_mask(lengths, x.shape[1])
        present = [masks[f"{m}_mask"] for m in ("audio", "video") if m in batch]
        pred_mask = (present[0] | present[-1]) & valid  # union of the masks of the streams present
        targets = resample_targets(batch["targets"].to(x.device), x.shape[1], self.label_rate, enc.frame_rate)
        labelled = valid & (targets >= 0)
        hidden = enc.contextualize(x, lengths).hidden
        logits = cosine_logits(self.final_proj(hidden), self.label_embeddings, self.temperature)  # (B, T, V)
        masked, masked_acc = weighted_cross_entropy(logits, targets, labelled & pred_mask)
        unmasked, unmasked_acc = weighted_cross_entropy(logits, targets, labelled & ~pred_mask)
        loss = masked + self.unmasked_weight * unmasked
        return {
            "loss": loss,
            "masked_loss": masked.detach(),
            "unmasked_loss": unmasked.detach(),
            "masked_accuracy": masked_acc.detach(),
            "unmasked_accuracy": unmasked_acc.detach(),
            "mask_fraction": pred_mask.sum().float() / valid.sum().clamp(min=1).float(),
        }


@OBJECTIVES.register
def av_hubert(
    size: str = "base",
    num_classes: int = 100,  # first iteration: k-means on MFCC (AV-HuBERT, sec. 4: 100 clusters)
    label_rate: float = 100.0,  # MFCC labels at 100 Hz; labels from a 25 Hz AV layer: 25
    audio_mask_prob: float = 0.8,  # AV-HuBERT mask_prob_audio
    audio_mask_span: int = 10,  # mask_length_audio
    video_mask_prob: float = 0.3,  # mask_prob_image
    video_mask_span: int = 5,  # mask_length_image
    min_masks: int = 2,
    temperature: float = 0.1,  # HuBERT kappa
    unmasked_weight: float = 0.0,
    final_dim: int | None = None,
    noise_dir: str | None = None,
    noise_prob: float = 0.25,  # noise-augmented AV-HuBERT: a quarter of the utterances get noise
    snr_low: float = -5.0,
    snr_high: float = 5.0,
    seed: int = 0,
    encoder: dict[str, Any] | None = None,
) -> AVHubert:
    """AV-HuBERT on the ``av_<size>`` encoder (``encoder``: preset overrides, e.g.
    ``{modality_dropout: 0.5}``); ``noise_dir``: a folder of noise recordings (``mmssl synth``
    writes ``noise/train``), None for no noise augmentation."""
    presets = {"tiny": av_tiny, "base": av_base, "large": av_large}
    if size not in presets:
        raise ConfigError(f"av_hubert: size must be one of {sorted(presets)}, got {size!r}")
    enc = presets[size](**(encoder or {}))
    if enc.frame_spec is None:
        raise ConfigError("av_hubert needs an encoder with an audio stream")
    masks = AVMasks(enc.frame_spec, audio_mask_prob, audio_mask_span, video_mask_prob, video_mask_span, min_masks,
                    seed, enc.fusion.modality_dropout, enc.fusion.audio_dropout)
    noise = AddNoise(NoiseBank(noise_dir), noise_prob, (snr_low, snr_high)) if noise_dir else None
    dim = final_dim if final_dim is not None else FINAL_DIM.get(size, 256)
    return AVHubert(enc, masks, num_classes, dim, label_rate, temperature, unmasked_weight, noise)
