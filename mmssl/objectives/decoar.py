"""DeCoAR (Ling et al., 2020, "Deep contextualized acoustic representations for
semi-supervised speech recognition"): slice reconstruction from a forward and a backward LSTM.

A forward and a backward LSTM stack (``mmssl.encoders.recurrent.BiRecurrentEncoder``) read
normalised 80-d log mel frames. For every slice ``x_t .. x_{t+K}`` that lies inside the
utterance, the forward state at its first frame and the backward state at its last frame are
concatenated, ``z_t = [fwd_t; bwd_{t+K}]`` (DeCoAR, sec. 2), and one linear head per offset
``i = 0..K`` reconstructs ``x_{t+i}`` from ``z_t``; the loss is the L1 distance summed over the
slice, here averaged over slices, offsets and mel bins. Only the first frame of the
slice has been read by the forward state and only the last by the backward one: the ``K - 1``
frames inside are reconstructed from context alone. The ``K + 1`` heads are one linear layer
``2C -> (K + 1) F`` (the same as separate heads).

Slices that would run past an utterance's last valid frame are left out, so an utterance of
``K`` frames or fewer adds nothing to the loss. The features for downstream use are the
concatenated ``[fwd_t; bwd_t]`` states (``encoder.contextualize``). The model is
bidirectional, so its log mels are normalised per utterance. The encoder has no ``mask``:
fine-tuning masks (``mmssl finetune-asr``'s time masking) are not applied to DeCoAR encoders.

Shape legend: B batch, S samples, T frames, F mel bins, C channels per direction, K slice size.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mmssl.encoders.recurrent import BiRecurrentEncoder, build_bilstm_encoder
from mmssl.errors import ConfigError
from mmssl.nn.reconstruction import future_slices, masked_l1, shift_targets
from mmssl.objectives.base import Objective, check_settings, size_preset
from mmssl.registry import OBJECTIVES


class DeCoARObjective(Objective):
    """``forward(batch)`` reads ``audio (B, S)``, ``audio_lens (B,)``. Parts: ``encoder`` (a
    ``BiRecurrentEncoder``) and ``heads``, the linear map ``2C -> (K + 1) F``."""

    modalities = ("audio",)

    def __init__(self, encoder: BiRecurrentEncoder, slice_size: int = 16) -> None:
        super().__init__()
        if slice_size < 1:
            raise ConfigError(f"decoar: slice_size must be >= 1, got {slice_size}")
        self.encoder, self.slice_size = encoder, slice_size
        self.heads = nn.Linear(encoder.dim, (slice_size + 1) * encoder.feature_dim)

    def slice_inputs(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """``x (B, T, F)`` -> ``z (B, T, 2C)`` with ``z_t = [fwd_t; bwd_{t+K}]`` (zero where
        ``t + K`` is past the end) and ``weight (B, T)``, True where the slice is complete."""
        forward, backward = self.encoder.directions(x, lengths)
        later, weight = shift_targets(backward[-1], lengths, self.slice_size)  # bwd_{t+K} at t
        return torch.cat([forward[-1], later], dim=-1), weight

    def slice_loss(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """``x (B, T, F)`` log mels -> (mean L1 over complete slices, offsets and bins; number of
        complete slices)."""
        b, t, f = x.shape
        z, weight = self.slice_inputs(x, lengths)
        k = self.slice_size + 1
        targets, _ = future_slices(x, lengths, k)  # (B, T, K + 1, F): x_{t+i}, i = 0..K
        pred = self.heads(z)  # (B, T, (K + 1) F)
        return masked_l1(pred, targets.reshape(b, t, k * f), weight), weight.sum().float()

    def forward(self, batch: dict) -> dict[str, Tensor]:
        feats = self.encoder.extract(batch["audio"], batch["audio_lens"])
        loss, slices = self.slice_loss(feats.x, feats.lengths)
        return {"loss": loss, "l1_loss": loss.detach(), "slices": slices}


# per direction; base is DeCoAR's released model (four 1024-unit LSTM layers each way)
SIZES: dict[str, dict[str, int]] = {
    "tiny": {"dim": 32, "num_layers": 2},
    "base": {"dim": 1024, "num_layers": 4},
    "large": {"dim": 1536, "num_layers": 4},
}


@OBJECTIVES.register
def decoar(
    size: str = "base",
    slice_size: int = 16,  # DeCoAR's K: slices of K + 1 frames
    dropout: float = 0.0,
    encoder: dict[str, Any] | None = None,
) -> DeCoARObjective:
    """DeCoAR on the ``size`` preset; ``encoder`` may override ``dim``, ``num_layers``,
    ``num_mel_bins``."""
    settings = {**size_preset("decoar", size, SIZES), "dropout": dropout, **(encoder or {})}
    check_settings("decoar", settings, encoder, {"dim": 1, "num_layers": 1, "num_mel_bins": 1}, ("dropout",))
    try:
        enc = build_bilstm_encoder(**settings)
    except TypeError as err:
        raise ConfigError(f"objective.encoder: {err}") from None
    return DeCoARObjective(enc, slice_size)
