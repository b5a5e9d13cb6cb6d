"""Pieces of the masked-prediction objectives (HuBERT, WavLM, AV-HuBERT, wav2vec 2.0), shared
through here rather than through each other's files: target resampling, cosine logits over
label embeddings, the masked / unmasked cross-entropy, the frontend feature penalty and the
default size of the final projection.

Shape legend: B batch, T frames, L labels, D projection dim, V classes, F features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mmssl.errors import ConfigError
from mmssl.nn.padding import lengths_to_padding_mask

# HuBERT, sec. IV-D; wav2vec 2.0, sec. 4.2 / fairseq ``final_dim``: 256 for BASE, 768 for LARGE
FINAL_DIM = {"tiny": 32, "base": 256, "large": 768}


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
    logits: Tensor,
    targets: Tensor,
    pred_mask: Tensor,
    labelled: Tensor,
    masked_weight: float,
    unmasked_weight: float,
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


def feature_penalty(raw: Tensor, lengths: Tensor) -> Tensor:
    """Mean of ``raw (B, T, F) ** 2`` over valid frames and features (fairseq ``features_pen``)."""
    keep = (~lengths_to_padding_mask(lengths, raw.shape[1])).unsqueeze(-1).to(torch.float32)
    total = (raw.float().pow(2) * keep).sum()
    return total / (keep.sum() * raw.shape[-1]).clamp(min=1.0)


def final_dim_for(size: str, final_dim: int | None) -> int:
    if final_dim is not None:
        return final_dim
    if size not in FINAL_DIM:
        raise ConfigError(f"no default final_dim for model size {size!r}; set objective.final_dim")
    return FINAL_DIM[size]
