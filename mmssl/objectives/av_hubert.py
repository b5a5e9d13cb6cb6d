"""AV-HuBERT (Shi et al., 2022): masked prediction of cluster targets from audio and lip video.

Two ways to mask, as the reference's ``masking_type`` (its published recipes use ``feature``
up to the fourth iteration and ``input`` in the last; ``configs/av_hubert_iter1.yaml`` and
``configs/av_hubert.yaml``):

* ``input``: each modality is masked on its input to the fusion, with its own span settings
  (``mask_prob_audio=0.8``, ``mask_length_audio=10``, ``mask_prob_image=0.3``,
  ``mask_length_image=5``), and the loss covers the union of both masks.
  - audio: masked frames of the projected filterbank stream take a learned embedding (the
    reference puts its embedding on the normalised filterbank frames, before the projection);
  - video: masked frames are *replaced by frames from elsewhere in the same clip* (sec. 3.1,
    "segments substituted"), so the model cannot spot the mask from the input. Each masked
    run copies a run of the clip's own valid frames that never overlaps it (AV-HuBERT
    ``selection_type: same_seq``, :func:`substitution_index`).
* ``feature``: one span mask over the fused frames (the same settings for both streams, 0.8 x
  10 in the recipes) replaces the fused, projected frames with a learned embedding.

The fused stream (with modality dropout, :class:`mmssl.encoders.fusion.AVFusion`, then input
dropout) goes through the transformer; the loss is HuBERT's (Hsu et al., 2021, eq. 2-3; the
parts combined as in :func:`mmssl.nn.prediction.prediction_loss`): cross-entropy of cosine
similarities between the projected output and one embedding per cluster, divided by 0.1, plus
10 x the mean square of the fused features before their LayerNorm (``features_pen``,
``loss_weights: [10]``). Targets come from ``mmssl kmeans``: MFCC clusters in the first
iteration (100 Hz labels, ``label_rate=100``), then clusters of the previous checkpoint's
audio-visual features (25 Hz labels, ``label_rate=25``; ``mmssl.encoders.av.av_features``).

Noise augmentation (noise-augmented AV-HuBERT, Shi et al., 2022b): in the data workers, with
probability ``noise_prob`` (0.25) an utterance's waveform gets noise from a folder at
``noise_snr`` dB (0, or drawn uniformly in a ``[low, high]`` range), before any feature is
computed; the targets stay those of the clean audio.

Shape legend: B batch, S samples, T frames (25 Hz), L labels, C model dim, D projection dim,
V clusters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmssl.data.noise import AddNoise, NoiseBank, snr_range
from mmssl.encoders.av import AVEncoder, av_base, av_large, av_small, av_tiny, substitute_frames
from mmssl.encoders.base import FrameSpec
from mmssl.encoders.fusion import sample_keep
from mmssl.errors import ConfigError, DataError
from mmssl.nn.gradient import scale_grad
from mmssl.nn.masking import compute_span_mask, hook_generator
from mmssl.nn.padding import lengths_to_padding_mask
from mmssl.nn.prediction import cosine_logits, feature_penalty, prediction_loss, resample_targets
from mmssl.objectives.base import BatchHook, Objective
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
    """The masks of one batch over the fused frames (``T``: the smaller of both streams'
    padded counts; ``frame_spec`` counts the audio frames), True = masked.

    A picklable batch hook. With ``masking_type="input"`` (AV-HuBERT ``masking_type: input``)
    it adds ``audio_mask (B, T)``, ``video_mask (B, T)`` and ``video_source (B, T_video)``, each
    stream masked on its own input; with ``"feature"`` (``masking_type: feature``) one
    ``feature_mask (B, T)`` (``audio_prob`` x ``audio_span``) that masks the fused features.
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
    masking_type: str = "input"

    def generator(self) -> torch.Generator:
        """A fresh CPU generator for one batch, from ``hook_generator(seed)``: a pure function
        of the batch position the batch stream seeded (same masks whatever the worker count,
        and after a resume)."""
        return hook_generator(self.seed)

    def keys(self, batch: dict) -> tuple[str, ...]:
        """The mask keys ``make`` gives for ``batch`` (modality dropout's aside)."""
        if self.masking_type == "feature":
            return ("feature_mask",)
        return ("audio_mask", "video_mask") + (("video_source",) if "video" in batch else ())

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
        span_mask = compute_span_mask(lengths, t, self.audio_prob, self.audio_span, self.min_masks, generator)
        if self.masking_type == "feature":
            out = {"feature_mask": span_mask}
        else:
            out = {
                "audio_mask": span_mask,
                "video_mask": compute_span_mask(
                    lengths, t, self.video_prob, self.video_span, self.min_masks, generator
                ),
            }
        if "video" in batch and self.masking_type == "input":
            tv = batch["video"].shape[1]
            wide = F.pad(out["video_mask"], (0, tv - t), value=False)
            out["video_source"] = substitution_index(wide, batch["video_lens"].to(wide.device), generator)
        if "audio" in batch and "video" in batch and self.modality_dropout > 0:
            keep = sample_keep(lengths.shape[0], self.modality_dropout, self.audio_dropout, generator)
            out["keep_audio"], out["keep_video"] = keep
        return out

    def __call__(self, batch: dict) -> dict:
        batch.update(
            self.make(
                {k: (v.cpu() if isinstance(v, Tensor) else v) for k, v in batch.items()}, self.generator()
            )
        )
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
    ``targets (B, L)`` and, from the batch hook, the masks of ``masks.keys`` (made here when
    absent). Parts: ``encoder``, ``masks``, optional ``noise``.

    The training settings the reference keeps in its model apply here, between the encoder's
    halves, so that fine-tuning and feature extraction from the same encoder do not inherit
    them: ``feature_grad_mult`` scales the gradient reaching both streams' frontends (the
    filterbank projection, the lip encoder and its projection), ``input_dropout`` follows the
    fusion's projection, and the feature penalty (``penalty_weight`` x the mean square of the
    fused features before their LayerNorm) is added to the loss.
    """

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
        penalty_weight: float = 10.0,
        input_dropout: float = 0.1,
        feature_grad_mult: float = 0.1,
        noise: AddNoise | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ConfigError(f"av_hubert: num_classes must be >= 2, got {num_classes}")
        self.encoder, self.masks, self.noise = encoder, masks, noise
        self.final_proj = nn.Linear(encoder.dim, final_dim)
        self.label_embeddings = nn.Parameter(torch.empty(num_classes, final_dim).uniform_())
        # feature masking: a learned vector drawn uniformly in [0, 1) for masked fused frames
        use_mask = masks.masking_type == "feature"
        self.feature_mask_embedding = nn.Parameter(torch.rand(encoder.dim)) if use_mask else None
        self.input_dropout = nn.Dropout(input_dropout)
        self.num_classes, self.label_rate = num_classes, label_rate
        self.temperature, self.unmasked_weight = temperature, unmasked_weight
        self.penalty_weight, self.feature_grad_mult = penalty_weight, feature_grad_mult

    def batch_hook(self) -> BatchHook:
        return self.masks if self.noise is None else NoisyAVMasks(self.noise, self.masks)

    def _batch_masks(self, batch: dict, lengths: Tensor, t: int) -> dict[str, Tensor]:
        keys = self.masks.keys(batch)
        if all(k in batch for k in keys):
            keys += tuple(k for k in ("keep_audio", "keep_video") if k in batch)
            made = {k: batch[k].to(lengths.device, non_blocking=True) for k in keys}
        else:
            made = self.masks.make(batch)
        for key in (k for k in keys if k.endswith("_mask")):
            if made[key].shape != (lengths.shape[0], t):
                raise DataError(
                    f"batch {key!r} has shape {tuple(made[key].shape)} but the encoder gives "
                    f"({lengths.shape[0]}, {t}) fused frames: the mask hook and the encoder disagree"
                )
        return made

    def _features(self, batch: dict, masks: dict[str, Tensor], t: int) -> tuple[Tensor, Tensor]:
        """Both streams, input-masked, side by side before the fusion's LayerNorm:
        ``(features (B, T, Ca + Cv), lengths (B,))`` (AV-HuBERT ``features``)."""
        enc = self.encoder
        a = a_lens = v = v_lens = None
        if "audio" in batch:
            a, _, a_lens = enc.audio_features(batch["audio"], batch["audio_lens"])
            a = scale_grad(a, self.feature_grad_mult)
            if "audio_mask" in masks:
                a = enc.mask_audio(a, F.pad(masks["audio_mask"], (0, a.shape[1] - t), value=False))
        if "video" in batch:
            video = batch["video"]
            if "video_source" in masks:
                video = substitute_frames(video, masks["video_source"])
            v, v_lens = enc.video_features(video, batch["video_lens"])
            v = scale_grad(v, self.feature_grad_mult)
        keep = (masks["keep_audio"], masks["keep_video"]) if self.training and "keep_audio" in masks else None
        return enc.fusion.concat(a, a_lens, v, v_lens, keep)

    def _pred_mask(self, batch: dict, masks: dict[str, Tensor]) -> Tensor:
        if self.masks.masking_type == "feature":
            return masks["feature_mask"]
        present = [masks[f"{m}_mask"] for m in ("audio", "video") if m in batch]
        return present[0] | present[-1]  # union of the masks of the streams present

    def forward(self, batch: dict) -> dict[str, Tensor]:
        if "targets" not in batch:
            raise DataError("the batch has no 'targets': set data.labels to a `mmssl kmeans` output folder")
        enc = self.encoder
        lengths, t = self.masks.fused_lengths(batch)
        masks = self._batch_masks(batch, lengths, t)
        features, lengths = self._features(batch, masks, t)
        penalty = feature_penalty(features, lengths)  # AV-HuBERT ``features_pen``
        x = self.input_dropout(enc.fusion.project(features, lengths))  # ``dropout_input``
        valid = ~lengths_to_padding_mask(lengths, x.shape[1])
        pred_mask = self._pred_mask(batch, masks) & valid
        if self.feature_mask_embedding is not None:
            x = torch.where(pred_mask.unsqueeze(-1), self.feature_mask_embedding.to(x.dtype), x)
        targets = resample_targets(batch["targets"].to(x.device), x.shape[1], self.label_rate, enc.frame_rate)
        labelled = valid & (targets >= 0)
        hidden = enc.contextualize(x, lengths).hidden
        logits = cosine_logits(self.final_proj(hidden), self.label_embeddings, self.temperature)  # (B, T, V)
        out = prediction_loss(logits, targets, pred_mask, labelled, 1.0, self.unmasked_weight)
        out["loss"] = out["loss"] + self.penalty_weight * penalty  # criterion ``loss_weights: [10]``
        out["feature_penalty_loss"] = penalty.detach()
        out["mask_fraction"] = pred_mask.sum().float() / valid.sum().clamp(min=1).float()
        return out


# AV-HuBERT ``final_dim: 256`` for BASE and LARGE alike (HuBERT LARGE uses 768)
AV_FINAL_DIM = {"tiny": 32, "small": 256, "base": 256, "large": 256}
MASKING_TYPES = ("input", "feature")


def _check_masking(masking_type: str, audio: tuple[float, int], video: tuple[float, int]) -> None:
    if masking_type not in MASKING_TYPES:
        raise ConfigError(
            f"objective.masking_type must be one of {', '.join(MASKING_TYPES)}, got {masking_type!r}"
        )
    if masking_type == "feature" and audio != video:
        raise ConfigError(
            "objective.masking_type=feature masks both streams with one mask (AV-HuBERT asserts the same "
            f"settings): audio_mask_prob/span {audio} != video_mask_prob/span {video}"
        )


def _shared_encoder(shared: nn.Module, overrides: dict[str, Any] | None, masking_type: str) -> AVEncoder:
    """The encoder objective ``multi`` shares with this one, checked against its settings."""
    if not isinstance(shared, AVEncoder):
        raise ConfigError(
            f"av_hubert trains an audio-visual encoder; the shared one is a {type(shared).__name__}"
        )
    if overrides:
        raise ConfigError(
            "objective.encoder overrides apply to a fresh encoder, not to a shared one "
            "(set them on the part that builds it)"
        )
    if masking_type == "input" and shared.audio_mask_embedding is None:
        raise ConfigError(
            "objective.masking_type=input masks the audio stream with the encoder's mask embedding, "
            "which the shared encoder was built without (its own objective masks the fused features)"
        )
    return shared


@OBJECTIVES.register(shares_encoder=True, train_data=("noise_dir",))
def av_hubert(
    size: str = "base",
    num_classes: int = 100,  # first iteration: k-means on MFCC (AV-HuBERT, sec. 4: 100 clusters)
    label_rate: float = 100.0,  # MFCC labels at 100 Hz; labels from a 25 Hz AV layer: 25
    masking_type: str = "input",  # AV-HuBERT ``masking_type``: input (last iteration) | feature (earlier)
    audio_mask_prob: float = 0.8,  # AV-HuBERT mask_prob_audio
    audio_mask_span: int = 10,  # mask_length_audio
    video_mask_prob: float = 0.3,  # mask_prob_image
    video_mask_span: int = 5,  # mask_length_image
    min_masks: int = 2,
    temperature: float = 0.1,  # HuBERT kappa (``logit_temp``)
    unmasked_weight: float = 0.0,  # criterion ``pred_nomask_weight``
    penalty_weight: float = 10.0,  # criterion ``loss_weights: [10]`` on ``features_pen``
    input_dropout: float = 0.1,  # ``dropout_input``, after the fusion's projection
    feature_grad_mult: float = 0.1,  # ``feature_grad_mult``, on both streams' frontends
    final_dim: int | None = None,  # None: 256 (``final_dim`` of AV-HuBERT BASE and LARGE); tiny: 32
    noise_dir: str | None = None,
    noise_prob: float = 0.25,  # noise-augmented AV-HuBERT ``noise_prob``: a quarter of the utterances
    noise_snr: float | list[float] = 0.0,  # ``noise_snr: 0`` dB; [low, high]: uniform in that range
    seed: int = 0,
    encoder: dict[str, Any] | None = None,
    shared_encoder: nn.Module | None = None,
) -> AVHubert:
    """AV-HuBERT on the ``av_<size>`` encoder (``encoder``: preset overrides, e.g.
    ``{modality_dropout: 0.5}``), or on ``shared_encoder``, an audio-visual encoder that other
    objectives train too (objective ``multi``); ``noise_dir``: a folder of noise recordings
    (``mmssl synth`` writes ``noise/train``), None for no noise augmentation."""
    presets = {"tiny": av_tiny, "small": av_small, "base": av_base, "large": av_large}
    if size not in presets:
        raise ConfigError(f"av_hubert: size must be one of {sorted(presets)}, got {size!r}")
    _check_masking(masking_type, (audio_mask_prob, audio_mask_span), (video_mask_prob, video_mask_span))
    if shared_encoder is not None:
        enc = _shared_encoder(shared_encoder, encoder, masking_type)
    else:
        # feature masking puts its own embedding on the fused frames: the audio stream's is left out
        enc = presets[size](**{"mask_embedding": masking_type == "input", **(encoder or {})})
    if enc.frame_spec is None:
        raise ConfigError("av_hubert needs an encoder with an audio stream")
    masks = AVMasks(
        enc.frame_spec,
        audio_mask_prob,
        audio_mask_span,
        video_mask_prob,
        video_mask_span,
        min_masks,
        seed,
        enc.fusion.modality_dropout,
        enc.fusion.audio_dropout,
        masking_type,
    )
    noise = AddNoise(NoiseBank(noise_dir), noise_prob, snr_range(noise_snr)) if noise_dir else None
    dim = final_dim if final_dim is not None else AV_FINAL_DIM.get(size, 256)
    return AVHubert(
        enc,
        masks,
        num_classes,
        dim,
        label_rate,
        temperature,
        unmasked_weight,
        penalty_weight,
        input_dropout,
        feature_grad_mult,
        noise,
    )
