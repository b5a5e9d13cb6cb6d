"""Causal context networks for autoregressive / contrastive predictive models (CPC, APC).

Each maps ``x (B, T, C_in)`` and ``lengths (B,)`` to ``(B, T, C)`` where output frame ``t``
depends only on input frames ``<= t``. Padding follows the valid frames, so a causal network
never lets it reach a valid output; padded output frames hold unspecified values.

* ``RecurrentContext``: a unidirectional GRU (CPC, sec. 3.1: one GRU layer with 256 units) or
  LSTM (APC, sec. 3: three 512-unit LSTM layers with residual connections). Its recurrent
  layers run in float32 also under bf16 autocast (``run_recurrent``).
* ``QuantizedRecurrentContext``: a ``RecurrentContext`` whose chosen layers' outputs pass a
  Gumbel-softmax vector quantizer (straight-through) before the next layer reads them (VQ-APC,
  Chung, Tang and Glass, 2020).
* ``CausalTransformerContext``: pre-LN transformer layers with a causal attention mask and a
  causal convolutional position embedding.

Shape legend: B batch, T frames, C channels.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from mmssl.errors import ConfigError
from mmssl.nn.dropout import Dropout
from mmssl.nn.padding import lengths_to_padding_mask
from mmssl.nn.quantizer import GumbelProductQuantizer, QuantizerOutput
from mmssl.nn.transformer import (
    ConvPositionalEmbedding,
    FeedForward,
    SelfAttention,
    TransformerLayer,
    bert_init,
)


def run_recurrent(layer: nn.RNNBase, x: Tensor) -> Tensor:
    """``layer`` (a batch-first GRU or LSTM) over ``x (B, T, C_in)`` -> its outputs ``(B, T, C)``,
    in the dtype of its weights (float32 as built) whatever the autocast state.

    Under bf16 autocast PyTorch hands the recurrence to a reduced-precision kernel: on the CPU,
    oneDNN's bf16 LSTM, which it builds only with AVX-512 and fails to build on an AVX2-only
    CPU ("could not create a primitive descriptor for the LSTM forward propagation
    primitive"); on CUDA, cuDNN in float16 whatever dtype autocast was given (seen with torch
    2.11 on an H200), without the loss scaling float16 needs. Here the layer runs as without
    autocast (its weights are float32), so every CPU and GPU takes a float32 kernel; the layers
    around it still run in bf16."""
    kind = x.device.type  # "meta" has no autocast
    with (
        torch.autocast(kind, enabled=False)
        if torch.amp.is_autocast_available(kind)
        else contextlib.nullcontext()
    ):
        y, _ = layer(x.to(layer.weight_ih_l0.dtype))
    return y


class RecurrentContext(nn.Module):
    """Stack of unidirectional GRU or LSTM layers; ``residual`` adds each layer's input to its
    output from the second layer on (APC, sec. 3). Outputs are float32, also under autocast
    (``run_recurrent``)."""

    def __init__(
        self,
        input_dim: int,
        dim: int,
        num_layers: int = 1,
        cell: str = "gru",
        dropout: float = 0.0,
        residual: bool = False,
    ) -> None:
        super().__init__()
        rnn = {"gru": nn.GRU, "lstm": nn.LSTM}.get(cell)
        if rnn is None:
            raise ConfigError(f"recurrent context: cell must be 'gru' or 'lstm', got {cell!r}")
        if num_layers < 1:
            raise ConfigError(f"recurrent context: num_layers must be >= 1, got {num_layers}")
        self.dim, self.residual = dim, residual
        self.layers = nn.ModuleList(
            rnn(input_dim if i == 0 else dim, dim, batch_first=True) for i in range(num_layers)
        )
        self.dropout = Dropout(dropout)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        """``x (B, T, C_in)``, ``lengths (B,)`` -> ``(B, T, C)``."""
        return self.final(self.layer_outputs(x, lengths)[-1])

    def layer_outputs(self, x: Tensor, lengths: Tensor) -> list[Tensor]:
        """The output ``(B, T, C)`` of every layer, in order."""
        # Running over the padded tail is harmless (it comes after every valid frame) and
        # avoids packing, which needs the lengths on the host.
        outputs = []
        for i, layer in enumerate(self.layers):
            y = self.dropout(run_recurrent(layer, x))
            x = x + y if (self.residual and i > 0) else y
            outputs.append(x)
        return outputs

    def final(self, last: Tensor) -> Tensor:
        """The network's output from its last layer's: the same (no final norm)."""
        return last


class QuantizedRecurrentContext(RecurrentContext):
    """``RecurrentContext`` with ``quantizers``: layer index (0-based) -> a Gumbel quantizer of
    the layer's width, whose output replaces the layer's (what the next layer, the residual
    connection and ``layer_outputs`` see). A quantizer is per frame and the stack is causal,
    so output frame ``t`` still depends only on input frames ``<= t``."""

    def __init__(
        self,
        input_dim: int,
        dim: int,
        num_layers: int,
        quantizers: dict[int, GumbelProductQuantizer],
        cell: str = "lstm",
        dropout: float = 0.0,
        residual: bool = False,
    ) -> None:
        super().__init__(input_dim, dim, num_layers, cell, dropout, residual)
        bad = [i for i in quantizers if not 0 <= i < num_layers]
        if bad:
            raise ConfigError(f"quantized recurrent context: no layer {bad[0]} (layers 0..{num_layers - 1})")
        if not quantizers:
            raise ConfigError("quantized recurrent context: no layer to quantize")
        self.quantizers = nn.ModuleDict({str(i): q for i, q in sorted(quantizers.items())})

    def quantized_layer_outputs(
        self, x: Tensor, lengths: Tensor
    ) -> tuple[list[Tensor], list[QuantizerOutput]]:
        """Every layer's output ``(B, T, C)`` (quantized where a quantizer sits) and each
        quantizer's output, in layer order; padded frames are left out of the perplexities."""
        weight = (~lengths_to_padding_mask(lengths.to(x.device), x.shape[1])).float()  # (B, T)
        outputs, quantized = [], []
        for i, layer in enumerate(self.layers):
            y = self.dropout(run_recurrent(layer, x))
            x = x + y if (self.residual and i > 0) else y
            if str(i) in self.quantizers:
                q = self.quantizers[str(i)](x, weight)
                x = q.quantized.to(x.dtype)
                quantized.append(q)
            outputs.append(x)
        return outputs, quantized

    def layer_outputs(self, x: Tensor, lengths: Tensor) -> list[Tensor]:
        return self.quantized_layer_outputs(x, lengths)[0]

    def set_step(self, step: int) -> None:
        """Every quantizer's Gumbel temperature after ``step`` updates."""
        for q in self.quantizers.values():
            q.set_step(step)


class CausalTransformerContext(nn.Module):
    """Input projection, causal position convolution, pre-LN transformer layers with a causal
    attention mask, final LayerNorm."""

    def __init__(
        self,
        input_dim: int,
        dim: int,
        num_layers: int = 2,
        num_heads: int = 4,
        ffn_dim: int | None = None,
        dropout: float = 0.1,
        pos_conv_kernel: int = 16,
        pos_conv_groups: int = 4,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.proj = nn.Linear(input_dim, dim) if input_dim != dim else nn.Identity()
        self.pos_conv = ConvPositionalEmbedding(dim, pos_conv_kernel, pos_conv_groups, causal=True)
        ffn = ffn_dim or 4 * dim
        self.layers = nn.ModuleList(
            TransformerLayer(
                SelfAttention(dim, num_heads, dropout),
                FeedForward(dim, ffn, 0.0, dropout),
                dropout,
                pre_norm=True,
            )
            for _ in range(num_layers)
        )
        bert_init(self.layers)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        """``x (B, T, C_in)``, ``lengths (B,)`` -> ``(B, T, C)``."""
        return self.final(self.layer_outputs(x, lengths)[-1])

    def layer_outputs(self, x: Tensor, lengths: Tensor) -> list[Tensor]:
        """The output ``(B, T, C)`` of every layer, in order, before the final norm."""
        t = x.shape[1]
        padding_mask = lengths_to_padding_mask(lengths, t)
        x = self.proj(x)
        x = x + self.pos_conv(x)
        future = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)  # (T, T) keys after the query
        causal = torch.zeros(1, t, t, dtype=x.dtype, device=x.device)
        causal = causal.masked_fill(future, torch.finfo(x.dtype).min)  # (1, T, T) additive
        outputs = []
        for layer in self.layers:
            x = layer(x, padding_mask, causal)
            outputs.append(x)
        return outputs

    def final(self, last: Tensor) -> Tensor:
        """The network's output from its last layer's: the final LayerNorm."""
        return self.norm(last)
