"""The encoder of masked reconstruction pretraining (Mockingjay, Liu et al., 2020; TERA, Liu,
Li and Lee, 2021; the objective is ``mmssl.objectives.masked_recon``): stacked normalised log
mels, a linear projection and a post-LN transformer with fixed sinusoidal positions
(``mmssl.nn.transformer.SinusoidalPositions``).

Shape legend: B batch, T frames (stacked), C model dim.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mmssl.encoders.audio import AudioEncoder
from mmssl.nn import transformer as tr
from mmssl.nn.reconstruction import LogMelFrontend, StackedLogMelFrontend


class MaskedReconEncoder(AudioEncoder):
    """An ``AudioEncoder`` (``StackedLogMelFrontend`` -> linear projection -> transformer) whose
    ``mask`` matches masked-reconstruction pretraining: there a chosen input frame is zeroed
    (80% of the time, Mockingjay sec. 2.3) before the projection, so a masked projected frame
    is the projection of the zero frame (its bias). It keeps no ``mask_embedding``; weights
    saved with one (an unused random vector) still load."""

    def __init__(
        self, frontend: StackedLogMelFrontend, projection: nn.Linear, transformer: tr.TransformerEncoder
    ) -> None:
        super().__init__(frontend, projection, transformer)  # type: ignore[arg-type]
        del self.mask_embedding  # drawn by AudioEncoder (same random stream), never used here
        self.register_load_state_dict_pre_hook(_drop_mask_embedding)

    def project(self, raw: Tensor) -> tuple[Tensor, Tensor]:
        """One linear layer, no input dropout: ``clean`` and ``x`` are the same ``(B, T, C)``."""
        x = self.projection(raw)
        return x, x

    def mask(self, x: Tensor, pred_mask: Tensor) -> Tensor:
        """``x (B, T, C)`` projected features -> the frames where ``pred_mask (B, T)`` is True
        replaced by the projection of a zero input frame ``(C,)``."""
        zero = self.projection(x.new_zeros(self.feature_dim))  # (C,): W 0 + b
        return torch.where(pred_mask.unsqueeze(-1), zero.to(x.dtype), x)


def _drop_mask_embedding(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    state_dict.pop(prefix + "mask_embedding", None)


def build_masked_recon_encoder(
    dim: int = 768,
    num_layers: int = 3,
    num_heads: int = 12,
    ffn_dim: int = 3072,
    num_mel_bins: int = 80,
    stack: int = 3,
    dropout: float = 0.1,
    attention_dropout: float = 0.1,
    activation_dropout: float = 0.0,
    layer_drop: float = 0.0,
    pre_norm: bool = False,
) -> MaskedReconEncoder:
    """Stacked normalised log mels -> linear projection -> post-LN transformer with sinusoidal
    positions. Defaults: Mockingjay / TERA base (3 layers, 768 dims, 12 heads, FFN 3072,
    dropout 0.1, GELU; s3prl ``config_model``)."""
    frontend = StackedLogMelFrontend(LogMelFrontend(num_mel_bins, normalize="utterance"), stack)
    layers = tr.build_transformer(
        dim,
        num_layers,
        num_heads,
        ffn_dim,
        dropout=dropout,
        attention_dropout=attention_dropout,
        activation_dropout=activation_dropout,
        pre_norm=pre_norm,
        pos_conv_kernel=0,
    ).layers
    transformer = tr.TransformerEncoder(
        tr.SinusoidalPositions(dim),
        list(layers),
        dim,
        dropout,
        pre_norm,
        layer_drop,  # type: ignore[arg-type]
    )
    # Mockingjay's input projection (s3prl ``spec_transform``) is one linear layer; the
    # post-LN transformer adds the positions and layer-normalises the sum, ``LN(W x + p)``
    projection = nn.Linear(frontend.out_dim, dim)
    tr.bert_init(projection)
    return MaskedReconEncoder(frontend, projection, transformer)
