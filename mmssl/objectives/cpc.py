"""Contrastive predictive coding (van den Oord et al., 2018) and wav2vec (Schneider et al., 2019).

The encoder (``cpc_<size>`` presets, ``mmssl.encoders.audio.CPCEncoder``) is a strided
convolutional frontend that turns the waveform into latents ``z`` (100 Hz: kernels
(10, 8, 4, 4, 4), strides (5, 4, 2, 2, 2), CPC sec. 3.1 and wav2vec sec. 2) and a causal context
network that summarises ``z_<=t`` into ``c_t`` (CPC: one 256-unit GRU). Objectives hold it as
``.encoder``, so its layers can be clustered or probed like any speech encoder's. For each of
K = 12 future steps a linear map ``W_k`` predicts ``z_{t+k}`` from ``c_t``; the score of a
candidate ``z`` is the dot product with the prediction. Distractors are drawn uniformly from the other valid
frames of the same utterance.

* ``loss="infonce"`` (CPC, eq. 4): cross-entropy picking the true ``z_{t+k}`` among 1 + N.
* ``loss="binary"`` (wav2vec, eq. 1): ``-log sigmoid(pos) - sum_n log sigmoid(-neg_n)``, i.e.
  the expectation over distractors times lambda = N (wav2vec sets lambda to the number of
  negatives, N = 10). wav2vec's context network is a stack of causal convolutions; here both
  methods take any causal context network of ``mmssl.nn.context`` (GRU by default).

Both losses are averaged over every (frame, step) pair whose target ``t + k`` lies inside the
utterance; padded frames are never a target, a distractor or a context.

Shape legend: B batch, S samples, T frames, K steps, N negatives, F latent dim, C context dim.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmssl.encoders import build_family
from mmssl.encoders.audio import CPCEncoder
from mmssl.errors import ConfigError
from mmssl.nn.contrastive import gather_logits, info_nce, sample_negatives
from mmssl.nn.padding import lengths_to_padding_mask
from mmssl.objectives.base import Objective
from mmssl.registry import OBJECTIVES

LOSSES = ("infonce", "binary")


def binary_contrastive(logits: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """wav2vec's loss on ``logits (B, A, 1 + N)`` (positive first): ``softplus(-pos) +
    sum_n softplus(neg_n)`` averaged over anchors with ``weight (B, A)``; -inf logits (missing
    distractors) add nothing. Returns (loss, accuracy of ranking the positive first)."""
    pos, neg = logits[..., 0], logits[..., 1:]
    per_anchor = F.softplus(-pos) + F.softplus(neg).sum(-1)  # softplus(-inf) = 0
    w = weight.to(per_anchor.dtype)
    total = w.sum().clamp(min=1.0)
    correct = (logits.argmax(-1) == 0).to(per_anchor.dtype)
    return (per_anchor * w).sum() / total, (correct * w).sum() / total


class CPCObjective(Objective):
    """``forward(batch)`` reads ``audio (B, S)`` and ``audio_lens (B,)``.

    Parts: ``encoder`` (a ``CPCEncoder``: ``extract`` gives the latents ``z (B, T, F)``,
    ``contextualize`` the causal context ``c (B, T, C)``); the K step predictors are one linear
    layer ``C -> K * F`` (the same as K separate ``W_k``)."""

    def __init__(
        self,
        encoder: CPCEncoder,
        num_steps: int = 12,
        num_negatives: int = 10,
        loss: str = "infonce",
    ) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ConfigError(f"cpc: loss must be one of {', '.join(LOSSES)}; got {loss!r}")
        if num_steps < 1 or num_negatives < 1:
            raise ConfigError(
                f"cpc: num_steps and num_negatives must be >= 1; got {num_steps}, {num_negatives}"
            )
        self.encoder = encoder
        self.predictor = nn.Linear(encoder.dim, num_steps * encoder.feature_dim)
        self.num_steps, self.num_negatives, self.loss_kind = num_steps, num_negatives, loss
        self.latent_dim = encoder.feature_dim

    def step_logits(self, z: Tensor, c: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """``z (B, T, F)``, ``c (B, T, C)`` -> logits ``(K, B, T, 1 + N)`` and weight ``(K, B, T)``
        (True where frame ``t + k`` is a valid target)."""
        b, t, _ = z.shape
        valid = ~lengths_to_padding_mask(lengths, t)  # (B, T)
        preds = self.predictor(c).view(b, t, self.num_steps, self.latent_dim)  # (B, T, K, F)
        frames = torch.arange(t, device=z.device)
        all_logits, all_weights = [], []
        for k in range(1, self.num_steps + 1):
            positives = (frames + k).clamp(max=t - 1).expand(b, t)  # (B, T)
            weight = (frames + k).unsqueeze(0) < lengths.unsqueeze(1)
            negatives, usable = sample_negatives(valid, positives, self.num_negatives)
            logits = gather_logits(preds[:, :, k - 1], z, positives, negatives, exclude=~usable)
            all_logits.append(logits)
            all_weights.append(weight)
        return torch.stack(all_logits), torch.stack(all_weights)

    def forward(self, batch: dict) -> dict[str, Tensor]:
        feats = self.encoder.extract(batch["audio"], batch["audio_lens"])
        z, lengths = feats.x, feats.lengths
        c = self.encoder.contextualize(z, lengths).hidden
        logits, weight = self.step_logits(z, c, lengths)
        k, b, t, n = logits.shape
        flat_logits, flat_weight = logits.view(k * b, t, n), weight.view(k * b, t)
        if self.loss_kind == "infonce":
            loss, accuracy = info_nce(flat_logits, flat_weight)
        else:
            loss, accuracy = binary_contrastive(flat_logits, flat_weight)
        return {"loss": loss, f"{self.loss_kind}_loss": loss.detach(), "accuracy": accuracy.detach()}


def build_cpc(
    size: str, num_steps: int, num_negatives: int, loss: str, context: str, overrides: dict[str, Any] | None
) -> CPCObjective:
    """A ``CPCObjective`` on the ``cpc_<size>`` encoder preset with ``context`` and ``overrides``
    (``channels``, ``context_dim``, ``context_layers``)."""
    encoder = build_family("cpc", size, {"context": context, **(overrides or {})})
    return CPCObjective(encoder, num_steps, num_negatives, loss)


@OBJECTIVES.register
def cpc(
    size: str = "base",
    num_steps: int = 12,  # CPC, sec. 3.1: predict up to 12 steps ahead
    num_negatives: int = 10,
    context: str = "gru",  # CPC: one GRU layer
    encoder: dict[str, Any] | None = None,
) -> CPCObjective:
    """CPC with the InfoNCE loss; ``encoder`` may override ``channels``, ``context_dim``,
    ``context_layers``."""
    return build_cpc(size, num_steps, num_negatives, "infonce", context, encoder)


@OBJECTIVES.register
def wav2vec(
    size: str = "base",
    num_steps: int = 12,  # wav2vec, sec. 2: K = 12 steps
    num_negatives: int = 10,  # wav2vec, sec. 3.3: ten distractors, lambda = 10
    context: str = "gru",
    encoder: dict[str, Any] | None = None,
) -> CPCObjective:
    """wav2vec: the same model trained with the binary (sigmoid) contrastive loss."""
    return build_cpc(size, num_steps, num_negatives, "binary", context, encoder)
