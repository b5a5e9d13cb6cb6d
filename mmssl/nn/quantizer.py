"""Quantizers that turn continuous frames into discrete codes.

``GumbelProductQuantizer``: the product quantizer of wav2vec 2.0 (Baevski et al., 2020,
sec. 2 and 3.2): G codebooks ("groups") of V entries; a linear layer scores every entry, a
straight-through hard Gumbel softmax picks one entry per group during training (argmax at
evaluation), and the picked entries are concatenated. The Gumbel temperature is annealed from
2 to 0.5 by a factor 0.999995 per update (sec. 4.2), driven from ``set_step``.

Every quantizer returns a ``QuantizerOutput``; more codebooks (a VQ-VAE codebook with
commitment loss) belong in this file beside it.

Shape legend: B batch, T frames, F input features, D code dimension, G groups, V entries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmssl.errors import ConfigError


@dataclass
class QuantizerOutput:
    """``quantized (B, T, D)``; ``codes (B, T, G)`` chosen entry per group; ``probs (B, T, G, V)``
    softmax of the entry scores without noise (what the diversity penalty averages);
    ``perplexity`` () of the batch-averaged ``probs`` summed over groups (the soft one that the
    diversity loss uses) and ``code_perplexity`` () of the hard choices, a usage metric."""

    quantized: Tensor
    codes: Tensor
    probs: Tensor
    perplexity: Tensor
    code_perplexity: Tensor


def batch_perplexity(probs: Tensor, weight: Tensor | None = None) -> Tensor:
    """``probs (B, T, G, V)`` -> sum over groups of ``exp(entropy)`` of the frame-averaged
    distribution. ``weight (B, T)`` (1 for real frames, 0 for padding) keeps padding out."""
    groups, entries = probs.shape[-2:]
    flat = probs.reshape(-1, groups, entries)  # (N, G, V)
    if weight is None:
        avg = flat.mean(0)
    else:
        w = weight.reshape(-1, 1, 1).to(flat.dtype)
        avg = (flat * w).sum(0) / w.sum().clamp(min=1.0)  # (G, V)
    entropy = -(avg * torch.log(avg.clamp(min=1e-7))).sum(-1)  # (G,)
    return torch.exp(entropy).sum()


def diversity_loss(perplexity: Tensor, groups: int, entries: int) -> Tensor:
    """wav2vec 2.0 eq. 4: ``(G V - perplexity) / (G V)``; 0 when every entry of every
    codebook is used equally often, close to 1 when one entry per codebook takes everything."""
    total = groups * entries
    return (total - perplexity) / total


class GumbelProductQuantizer(nn.Module):
    """``x (B, T, F)`` -> ``QuantizerOutput`` with ``quantized (B, T, D)``.

    ``groups`` G=2 and ``entries`` V=320 as in wav2vec 2.0 BASE/LARGE; ``dim`` D is the
    concatenated code size (each group contributes D/G). Temperature
    ``max(max_temp * decay**step, min_temp)``.
    """

    def __init__(
        self,
        input_dim: int,
        dim: int,
        groups: int = 2,
        entries: int = 320,
        max_temp: float = 2.0,
        min_temp: float = 0.5,
        temp_decay: float = 0.999995,
    ) -> None:
        super().__init__()
        if dim % groups:
            raise ConfigError(f"quantizer dim {dim} is not divisible by groups {groups}")
        self.groups, self.entries, self.dim = groups, entries, dim
        self.max_temp, self.min_temp, self.temp_decay = max_temp, min_temp, temp_decay
        self.temperature = max_temp
        self.weight_proj = nn.Linear(input_dim, groups * entries)
        # wav2vec 2.0 initialises the scores near zero and the codebook uniformly in [0, 1)
        nn.init.normal_(self.weight_proj.weight, mean=0.0, std=1.0)
        nn.init.zeros_(self.weight_proj.bias)
        self.codebook = nn.Parameter(torch.rand(groups, entries, dim // groups))

    def set_step(self, step: int) -> None:
        """Anneal the Gumbel temperature to its value after ``step`` updates (no tensors: no sync)."""
        self.temperature = max(self.max_temp * self.temp_decay**step, self.min_temp)

    def forward(self, x: Tensor, weight: Tensor | None = None) -> QuantizerOutput:
        """``x (B, T, F)``; ``weight (B, T)`` marks real frames for the perplexities."""
        b, t, _ = x.shape
        scores = self.weight_proj(x).float().view(b, t, self.groups, self.entries)  # (B, T, G, V)
        probs = scores.softmax(-1)
        if self.training:
            # straight-through: one-hot forward, softmax(scores + gumbel) / temperature backward
            onehot = F.gumbel_softmax(scores, tau=self.temperature, hard=True, dim=-1)
        else:
            onehot = F.one_hot(scores.argmax(-1), self.entries).to(scores.dtype)
        codes = onehot.argmax(-1)  # (B, T, G)
        picked = torch.einsum("btgv,gvd->btgd", onehot.to(self.codebook.dtype), self.codebook)
        quantized = picked.reshape(b, t, self.dim)  # (B, T, D)
        return QuantizerOutput(
            quantized=quantized,
            codes=codes,
            probs=probs,
            perplexity=batch_perplexity(probs, weight),
            code_perplexity=batch_perplexity(onehot.detach(), weight),
        )

    def extra_repr(self) -> str:
        return f"groups={self.groups}, entries={self.entries}, dim={self.dim}"

