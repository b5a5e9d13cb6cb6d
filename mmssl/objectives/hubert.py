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

WavLM (Chen et al., 2022) is this objective on the ``wavlm_<size>`` encoder (gated relative
position bias) with one more batch hook, run in the data workers before masking: utterance
mixing (``mmssl.data.utterance_mixing.UtteranceMixer``, WavLM sec. 3.2); its builder ``wavlm`` is here.
The shared pieces (target resampling, cosine logits, the loss, the feature penalty) live in
``mmssl.nn.prediction``, shared with AV-HuBERT.

Shape legend: B batch, S samples, T frames, L labels, C model dim, D projection dim, V clusters.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mmssl.data.utterance_mixing import UtteranceMixer
from mmssl.encoders import build_family
from mmssl.encoders.base import SpeechEncoder
from mmssl.errors import ConfigError, DataError
from mmssl.nn.masking import SpanMasker, prediction_mask
from mmssl.nn.padding import lengths_to_padding_mask
from mmssl.nn.prediction import (
    cosine_logits,
    feature_penalty,
    final_dim_for,
    prediction_loss,
    resample_targets,
)
from mmssl.objectives.base import BatchHook, ChainHook, Objective
from mmssl.registry import OBJECTIVES


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
        self.label_embeddings = nn.Parameter(
            torch.empty(num_classes, final_dim).uniform_()
        )  # fairseq ``label_embs_concat``
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
        targets = resample_targets(
            batch["targets"].to(lengths.device), t, self.label_rate, self.encoder.frame_rate
        )
        labelled = valid & (targets >= 0)

        hidden = self.encoder.contextualize(self.encoder.mask(feats.x, pred_mask), lengths).hidden
        logits = cosine_logits(self.final_proj(hidden), self.label_embeddings, self.temperature)  # (B, T, V)
        out = prediction_loss(logits, targets, pred_mask, labelled, self.masked_weight, self.unmasked_weight)
        penalty = feature_penalty(feats.raw, lengths)
        out["loss"] = out["loss"] + self.penalty_weight * penalty
        out["feature_penalty_loss"] = penalty.detach()
        out["mask_fraction"] = pred_mask.sum().float() / valid.sum().clamp(min=1).float()
        return out


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
    enc = build_family(family, size, encoder, feature_grad_mult)
    final_dim = final_dim_for(size, final_dim)
    masker = SpanMasker(enc.frame_spec, mask_prob, mask_span, min_masks, seed)
    return HubertObjective(
        enc,
        masker,
        num_classes,
        final_dim,
        label_rate,
        temperature,
        unmasked_weight=unmasked_weight,
        penalty_weight=penalty_weight,
        augment=augment,
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
        "hubert",
        size,
        num_classes,
        label_rate,
        mask_prob,
        mask_span,
        min_masks,
        temperature,
        unmasked_weight,
        penalty_weight,
        feature_grad_mult,
        final_dim,
        seed,
        encoder,
    )


@OBJECTIVES.register
def wavlm(
    size: str = "base",
    num_classes: int = 100,
    label_rate: float = 100.0,  # MFCC labels are 100 Hz; labels from a 50 Hz encoder layer: 50
    mask_prob: float = 0.8,  # WavLM follows HuBERT: p = 8% span starts ...
    mask_span: int = 10,  # ... of 10 frames
    min_masks: int = 2,
    temperature: float = 0.1,
    unmasked_weight: float = 0.0,
    penalty_weight: float = 10.0,
    feature_grad_mult: float | None = None,  # None: the preset's (0.1 for base and large)
    mix_prob: float = 0.2,  # WavLM, sec. 3.2: 20% of utterances are mixed
    mix_max_fraction: float = 0.5,
    mix_energy_db: tuple[float, float] = (-5.0, 5.0),
    final_dim: int | None = None,
    seed: int = 0,
    encoder: dict[str, Any] | None = None,
) -> HubertObjective:
    """WavLM on the ``wavlm_<size>`` encoder (gated relative position bias)."""
    mixer = UtteranceMixer(mix_prob, mix_max_fraction, tuple(mix_energy_db), seed)
    return build_hubert(
        "wavlm",
        size,
        num_classes,
        label_rate,
        mask_prob,
        mask_span,
        min_masks,
        temperature,
        unmasked_weight,
        penalty_weight,
        feature_grad_mult,
        final_dim,
        seed,
        encoder,
        augment=mixer,
    )
