"""Autoregressive predictive coding (APC; Chung et al., 2019, "An unsupervised autoregressive
model for speech representation learning").

A unidirectional LSTM stack (``mmssl.encoders.recurrent.build_apc_encoder``: three 512-unit
layers with residual connections) reads 80-d log mel frames ``x_1..x_T``; a linear layer maps
its output at frame ``t`` to a prediction ``y_t`` of the frame ``n`` steps ahead, and the loss is
the L1 distance ``sum_t |x_{t+n} - y_t|``, here averaged over frames and mel bins. The paper
sweeps the time shift n from 1 to 20; n = 3 is the default here. Only frames whose target
exists inside their utterance count: the last n valid frames and the padding of each
utterance never reach the loss.

The log mels are normalised with running statistics (frame ``t`` by the mean and variance of
frames ``0..t``, ``mmssl.nn.reconstruction.running_normalize``) rather than per utterance, so
the whole representation is causal: the state at frame ``t`` depends on no audio after frame
``t``'s window. The encoder has no ``mask``: fine-tuning masks (``mmssl finetune-asr``'s time
masking) are not applied to APC encoders.

Shape legend: B batch, S samples, T frames, F mel bins, C channels.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from mmssl.encoders.audio import CPCEncoder
from mmssl.encoders.recurrent import build_apc_encoder
from mmssl.errors import ConfigError
from mmssl.nn.reconstruction import masked_l1, shift_targets
from mmssl.objectives.base import Objective, check_settings, size_preset
from mmssl.registry import OBJECTIVES


class APCObjective(Objective):
    """``forward(batch)`` reads ``audio (B, S)``, ``audio_lens (B,)``. Parts: ``encoder`` (a
    causal ``CPCEncoder``, from ``build_apc_encoder``) and ``head``, the linear postnet ``C -> F``."""

    modalities = ("audio",)

    def __init__(self, encoder: CPCEncoder, time_shift: int = 3) -> None:
        super().__init__()
        if time_shift < 1:
            raise ConfigError(f"apc: time_shift must be >= 1, got {time_shift}")
        self.encoder, self.time_shift = encoder, time_shift
        self.head = nn.Linear(encoder.dim, encoder.feature_dim)

    def forward(self, batch: dict) -> dict[str, Tensor]:
        feats = self.encoder.extract(batch["audio"], batch["audio_lens"])
        x, lengths = feats.x, feats.lengths  # (B, T, F)
        hidden = self.encoder.contextualize(x, lengths).hidden  # (B, T, C)
        target, weight = shift_targets(x, lengths, self.time_shift)  # frame t + n for frame t
        loss = masked_l1(self.head(hidden), target, weight)
        return {"loss": loss, "l1_loss": loss.detach(), "predicted_frames": weight.sum().float()}


# widths and depths per model size; base is the paper's, large a wider variant
SIZES: dict[str, dict[str, int]] = {
    "tiny": {"dim": 32, "num_layers": 2},
    "base": {"dim": 512, "num_layers": 3},
    "large": {"dim": 1024, "num_layers": 4},
}


@OBJECTIVES.register
def apc(
    size: str = "base",
    time_shift: int = 3,  # APC's n (the paper sweeps 1..20)
    dropout: float = 0.0,
    encoder: dict[str, Any] | None = None,
) -> APCObjective:
    """APC on the ``size`` preset; ``encoder`` may override ``dim``, ``num_layers``,
    ``num_mel_bins``, ``residual``."""
    settings = {**size_preset("apc", size, SIZES), "dropout": dropout, **(encoder or {})}
    check_settings("apc", settings, encoder, {"dim": 1, "num_layers": 1, "num_mel_bins": 1}, ("dropout",))
    try:
        enc = build_apc_encoder(**settings)
    except TypeError as err:
        raise ConfigError(f"objective.encoder: {err}") from None
    return APCObjective(enc, time_shift)
