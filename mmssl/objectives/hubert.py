"""HuBERT (Hsu et al., 2021): masked prediction of offline cluster targets.

Spans of the projected features are masked (mask_prob 0.8, span 10: HuBERT, sec. IV-D) and
the transformer predicts, at every frame, the k-means cluster of that frame. The prediction
is a softmax over cosine similarities between the projected output and one learned embedding
per cluster, divided by a temperature of 0.1 (eq. 2-3). The logits come from one normalised
matmul ``(B, T, D) x (D, V)``, so no ``(V + 1, N, D)`` copy of the embeddings is made.

By default only masked frames count (``unmasked_weight=0``, HuBERT's alpha = 1); the unmasked
term can be switched on, and then, as in fairseq's ``hubert_criterion``, both parts' summed
cross-entropies are divided by the count of all the frames that count (not each part by its
own count). The wav2vec 2.0 feature penalty (weight 10, fairseq
``hubert_base_librispeech``) keeps the frontend outputs small.

Targets (``batch["targets"] (B, L)``, cluster ids, negative for padding) may come at any
label rate: they are resampled onto the encoder's frames by nearest earlier index (100 Hz MFCC
clusters onto 50 Hz frames take every second label, as fairseq's ``feat2tar_ratio``).

WavLM reuses this objective with an ``augment`` hook (utterance mixing, ``mmssl.objectives.wavlm``).

Shape legend: B batch, S samples, T frames, L labels, C model dim, D projection dim, V clusters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmssl.encoders.base import SpeechEncoder
from mmssl.errors import ConfigError, DataError
from mmssl.nn.masking import SpanMasker
from mmssl.nn.padding import lengths_to_padding_mask
from mmssl.objectives.base import BatchHook, Objective
from mmssl.objectives.wav2vec2 import build_encoder, feature_penalty, prediction_mask
from mmssl.registry import OBJECTIVES


def resample_targets(targets: Tensor, frames: int, label_rate: float, frame_rate: float) -> Tensor:
    """``targets (B, L)`` at ``label_rate`` Hz -> ``(B, T=frames)`` at ``frame_rate`` Hz.

    Frame ``t`` takes label ``floor(t * label_rate / frame_rate)``; frames past the last label
    get -1 (no target), as do frames whose label is negative (padding).
    """
    if label_rate <= 0 or frame_rate <= 0:
        raise ConfigError(f"label_rate and frame_rate must be positive; got {label_rate}, {frame_rate}")
    b, length = targets.shape
    steps = torch.arange(frames, device=targets.device, dtype=torch.float64)
    # the small epsilon keeps exact ratios (2.0, 0.5) exact under float rounding
    index = torch.floor(steps * (label_rate / frame_rate) + 1e-6).long()  # (T,)
    picked = targets.gather(1, index.clamp(max=max(length - 1, 0)).expand(b, frames))
    inside = (index < length).unsqueeze(0)
    return torch.where(inside & (picked >= 0), picked, torch.full_like(picked, -1))


def cosine_logits(x: Tensor, embeddings: Tensor, temperature: float) -> Tensor:
    """``x (B, T, D)``, ``embeddings (V, D)`` -> ``(B, T, V)`` cosine similarity / temperature."""
    x = F.normalize(x.float(), dim=-1, eps=1e-6)
    e = F.normalize(embeddings.float(), dim=-1, eps=1e-6)
    return x @ e.T / temperature


def cross_entropy_sums(logits: Tensor, targets: Tensor, weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Summed cross-entropy, correct count and frame count over frames where ``weight (B, T)``
    is True. ``logits (B, T, V)``, ``targets (B, T)`` (negative values are never read where
    weight is True). Three scalars."""
    safe = targets.clamp(min=0)
    nll = F.cross_entropy(logits.transpose(1, 2), safe, reduction="none")  # (B, T)
    w = weight.to(nll.dtype)
    correct = (logits.argmax(-1) == safe).to(nll.dtype)
    return (nll * w).sum(), (correct * w).sum(), w.sum()


def prediction_loss(
    logits: Tensor, targets: Tensor, pred_mask: Tensor, labelled: Tensor, masked_weight: float, unmasked_weight: float
) -> dict[str, Tensor]:
    """HuBERT's loss (fairseq ``hubert_criterion``): ``masked_weight`` x the summed
    cross-entropy of the masked frames plus ``unmasked_weight`` x that of the unmasked ones,
    divided by the frames of the parts that count (``sample_size``: the masked frames when
    ``masked_weight > 0`` plus the unmasked ones when ``unmasked_weight > 0``). With
    ``unmasked_weight = 0`` it is the mean over masked frames. ``logits (B, T, V)``,
    ``targets``, ``pred_mask``, ``labelled (B, T)`` (frames with a target).

    Returns ``loss`` and, for logging (detached), ``masked_loss`` / ``unmasked_loss`` (each
    part's mean) and ``masked_accuracy`` / ``unmasked_accuracy``."""
    m_nll, m_correct, m_count = cross_entropy_sums(logits, targets, labelled & pred_mask)
    u_nll, u_correct, u_count = cross_entropy_sums(logits, targets, labelled & ~pred_mask)
    sample_size = m_count * float(masked_weight > 0) + u_count * float(unmasked_weight > 0)
    loss = (masked_weight * m_nll + unmasked_weight * u_nll) / sample_size.clamp(min=1.0)
    m_count, u_count = m_count.clamp(min=1.0), u_count.clamp(min=1.0)
    return {
        "loss": loss,
        "masked_loss": (m_nll / m_count).detach(),
        "unmasked_loss": (u_nll / u_count).detach(),
        "masked_accuracy": (m_correct / m_count).detach(),
        "unmasked_accuracy": (u_correct / u_count).detach(),
    }


@dataclass
class ChainHook:
    """Run picklable batch hooks one after the other (e.g. utterance mixing, then masking)."""

    hooks: tuple[BatchHook, ...]

    def __call__(self, batch: dict) -> dict:
        for hook in self.hooks:
            batch = hook(batch)
        return batch


class HubertObjective(Objective):
    """``forward(batch)`` reads ``audio (B, S)``, ``audio_lens (B,)``, ``targets (B, L)`` and,
    from the batch hook, ``pred_mask (B, T)``. Parts: ``encoder``, ``masker`` and an optional
    ``augment`` hook run before the masker in the data workers."""

    modalities = ("audio",)

    def __init__(
        self,
        encoder: SpeechEncoder,
        masker: SpanMasker,
        num_classes: int,
        final_dim: int,
        label_rate: float,
        temperature: float = 0.1,
        masked_weight: float = 1.0,
        unmasked_weight: float = 0.0,
        penalty_weight: float = 10.0,
        augment: BatchHook | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ConfigError(f"hubert: num_classes must be >= 2, got {num_classes}")
        self.encoder, self.masker, self.augment = encoder, masker, augment
        self.final_proj = nn.Linear(encoder.dim, final_dim)
        self.label_embeddings = nn.Parameter(torch.empty(num_classes, final_dim).uniform_())  # fairseq ``label_embs_concat``
        self.num_classes, self.label_rate, self.temperature = num_classes, label_rate, temperature
        self.masked_weight, self.unmasked_weight = masked_weight, unmasked_weight
        self.penalty_weight = penalty_weight

    def batch_hook(self) -> BatchHook:
        return self.masker if self.augment is None else ChainHook((self.augment, self.masker))

    def forward(self, batch: dict) -> dict[str, Tensor]:
        if "targets" not in batch:
            raise DataError("the batch has no 'targets': set data.labels to a `mmssl kmeans` output folder")
        feats = self.encoder.extract(batch["audio"], batch["audio_lens"])
        b, t, _ = feats.x.shape
        lengths = feats.lengths
        valid = ~lengths_to_padding_mask(lengths, t)
        pred_mask = prediction_mask(batch, self.masker, lengths, t)
        targets = resample_targets(batch["targets"].to(lengths.device), t, self.label_rate, self.encoder.frame_rate)
        labelled = valid & (targets >= 0)

        hidden = self.encoder.contextualize(self.encoder.mask(feats.x, pred_mask), lengths).hidden
        logits = cosine_logits(self.final_proj(hidden), self.label_embeddings, self.temperature)  # (B, T, V)
        out = prediction_loss(logits, targets, pred_mask, labelled, self.masked_weight, self.unmasked_weight)
        penalty = feature_penalty(feats.raw, lengths)
        out["loss"] = out["loss"] + self.penalty_weight * penalty
        out["feature_penalty_loss"] = penalty.detach()
        out["mask_fraction"] = pred_mask.sum().float() / valid.sum().clamp(min=1).float()
        return out


# HuBERT, sec. IV-D / fairseq ``final_dim``: 256 for BASE, 768 for LARGE
FINAL_DIM = {"tiny": 32, "base": 256, "large": 768}


def build_hubert(
    family: str,
    size: str,
    num_classes: int,
    label_rate: float,
    mask_prob: float,
    mask_span: int,
    min_masks: int,
    temperature: float,
    unmasked_weight: float,
    penalty_weight: float,
    feature_grad_mult: float | None,
    final_dim: int | None,
    seed: int,
    encoder: dict[str, Any] | None,
    augment: BatchHook | None = None,
) -> HubertObjective:
    """Wire a ``HubertObjective`` on the ``<family>_<size>`` encoder preset."""
    enc = build_encoder(family, size, encoder, feature_grad_mult)
    if final_dim is None:
        if size not in FINAL_DIM:
            raise ConfigError(f"no default final_dim for model size {size!r}; set objective.final_dim")
        final_dim = FINAL_DIM[size]
    masker = SpanMasker(enc.frame_spec, mask_prob, mask_span, min_masks, seed)
    return HubertObjective(
        enc, masker, num_classes, final_dim, label_rate, temperature,
        unmasked_weight=unmasked_weight, penalty_weight=penalty_weight, augment=augment,
    )


@OBJECTIVES.register
def hubert(
    size: str = "base",
    num_classes: int = 100,  # HuBERT, sec. IV-C: 100 MFCC clusters (first iteration), 500 after
    label_rate: float = 100.0,  # MFCC labels are 100 Hz; labels from a 50 Hz encoder layer: 50
    mask_prob: float = 0.8,  # HuBERT, sec. IV-D: p = 8% of frames start a span ...
    mask_span: int = 10,  # ... of l = 10 frames
    min_masks: int = 2,
    temperature: float = 0.1,  # kappa = 0.1
    unmasked_weight: float = 0.0,  # alpha = 1: masked frames only
    penalty_weight: float = 10.0,
    feature_grad_mult: float | None = None,  # None: the preset's (0.1, fairseq ``hubert_base_librispeech``)
    final_dim: int | None = None,
    seed: int = 0,
    encoder: dict[str, Any] | None = None,
) -> HubertObjective:
    """HuBERT on the ``hubert_<size>`` encoder; ``encoder`` holds preset overrides."""
    return build_hubert(
        "hubert", size, num_classes, label_rate, mask_prob, mask_span, min_masks, temperature,
        unmasked_weight, penalty_weight, feature_grad_mult, final_dim, seed, encoder,
    )
