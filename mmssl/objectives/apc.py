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

VQ-APC (``vq_apc``; Chung, Tang and Glass, 2020, "Vector-quantized autoregressive predictive
coding") inserts vector quantization layers between the LSTM layers: the output of each layer
in ``vq_layers`` (1-based, default the last) is replaced by a codebook entry chosen by a
Gumbel-softmax (``mmssl.nn.quantizer.GumbelProductQuantizer`` with one group; hard one-hot
forward, the relaxed gradient backward, straight-through), so the information the model can
carry forward to predict the future is limited by the codebook size (``entries``; the paper
sweeps 128 to 1024 codes). The loss is APC's L1 alone; ``code_perplexity`` (of the hard
choices over valid frames, summed over the quantized layers) and ``code_usage`` (the fraction
of entries picked in the batch, averaged over them) are logged, with the Gumbel
``temperature``, annealed by update from ``max_temp`` to ``min_temp`` as in wav2vec 2.0. The
encoder's layers for downstream use are the layer outputs, quantized where a quantizer sits.

Shape legend: B batch, S samples, T frames, F mel bins, C channels, V codebook entries.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmssl.encoders.audio import CPCEncoder
from mmssl.encoders.recurrent import build_apc_encoder
from mmssl.errors import ConfigError
from mmssl.nn.context import QuantizedRecurrentContext
from mmssl.nn.padding import lengths_to_padding_mask
from mmssl.nn.quantizer import GumbelProductQuantizer
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


class VQAPCObjective(Objective):
    """``forward(batch)`` reads ``audio (B, S)``, ``audio_lens (B,)``. Parts: ``encoder`` (a
    causal ``CPCEncoder`` whose context is a ``QuantizedRecurrentContext``) and ``head``, the
    linear postnet ``C -> F``."""

    modalities = ("audio",)

    def __init__(self, encoder: CPCEncoder, time_shift: int = 3) -> None:
        super().__init__()
        if time_shift < 1:
            raise ConfigError(f"vq_apc: time_shift must be >= 1, got {time_shift}")
        if not isinstance(encoder.context, QuantizedRecurrentContext):
            raise ConfigError("vq_apc: the encoder's context has no quantizer")
        self.encoder, self.time_shift = encoder, time_shift
        self.head = nn.Linear(encoder.dim, encoder.feature_dim)

    @property
    def context(self) -> QuantizedRecurrentContext:
        return self.encoder.context  # type: ignore[return-value]

    def set_step(self, step: int) -> None:
        self.context.set_step(step)  # the Gumbel temperature after ``step`` updates

    def forward(self, batch: dict) -> dict[str, Tensor]:
        feats = self.encoder.extract(batch["audio"], batch["audio_lens"])
        x, lengths = feats.x, feats.lengths  # (B, T, F)
        layers, quantized = self.context.quantized_layer_outputs(x, lengths)
        hidden = self.context.final(layers[-1])  # (B, T, C)
        target, weight = shift_targets(x, lengths, self.time_shift)  # frame t + n for frame t
        loss = masked_l1(self.head(hidden), target, weight)
        valid = (~lengths_to_padding_mask(lengths, x.shape[1])).float()  # (B, T)
        usage = []
        for q, quantizer in zip(quantized, self.context.quantizers.values()):
            picked = F.one_hot(q.codes[..., 0], quantizer.entries).float()  # (B, T, V)
            counts = (picked * valid.unsqueeze(-1)).sum((0, 1))  # (V,)
            usage.append((counts > 0).float().mean())
        first = next(iter(self.context.quantizers.values()))
        return {
            "loss": loss,
            "l1_loss": loss.detach(),
            "predicted_frames": weight.sum().float(),
            "code_perplexity": sum(q.code_perplexity for q in quantized).detach(),
            "code_usage": torch.stack(usage).mean(),
            "temperature": torch.full((), first.temperature, device=loss.device),
        }


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


@OBJECTIVES.register
def vq_apc(
    size: str = "base",
    time_shift: int = 3,
    entries: int = 512,  # codebook size V (the paper sweeps 128..1024)
    vq_layers: list[int] | None = None,  # 1-based LSTM layers whose output is quantized; None: the last
    max_temp: float = 2.0,  # Gumbel temperature annealed by update, as wav2vec 2.0's quantizer
    min_temp: float = 0.5,
    temp_decay: float = 0.999995,
    dropout: float = 0.0,
    encoder: dict[str, Any] | None = None,
) -> VQAPCObjective:
    """VQ-APC on the ``size`` preset: APC with a Gumbel-softmax quantizer of ``entries`` codes
    after each LSTM layer of ``vq_layers``; ``encoder`` as :func:`apc`'s."""
    settings = {**size_preset("vq_apc", size, SIZES), "dropout": dropout, **(encoder or {})}
    check_settings("vq_apc", settings, encoder, {"dim": 1, "num_layers": 1, "num_mel_bins": 1}, ("dropout",))
    if isinstance(entries, bool) or not isinstance(entries, int) or entries < 2:
        raise ConfigError(f"vq_apc: objective.entries must be an integer >= 2; got {entries!r}")
    depth = int(settings["num_layers"])
    layers = [depth] if vq_layers is None else list(vq_layers)
    if not layers or any(
        isinstance(i, bool) or not isinstance(i, int) or not 1 <= i <= depth for i in layers
    ):
        raise ConfigError(f"vq_apc: objective.vq_layers must list layers in 1..{depth}; got {vq_layers!r}")
    dim = int(settings["dim"])
    quantizers = {
        i - 1: GumbelProductQuantizer(dim, dim, 1, entries, max_temp, min_temp, temp_decay) for i in layers
    }
    try:
        enc = build_apc_encoder(**settings, quantizers=quantizers)
    except TypeError as err:
        raise ConfigError(f"objective.encoder: {err}") from None
    return VQAPCObjective(enc, time_shift)
