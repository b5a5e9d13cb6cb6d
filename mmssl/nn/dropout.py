"""Dropout with a cheaper mask on a CPU.

On a CPU, ``F.dropout`` draws its mask with ``bernoulli_``, element by element on one thread;
a uniform draw (``torch.rand``) of the same size costs about a third as much (BENCHMARKS.md,
"Dropout on a CPU"), and dropout's masks took 9-10 % of the small audio-visual model's CPU
training step. Here a value is kept where a uniform draw is at least ``p`` and scaled by
``1 / (1 - p)``: the same distribution as ``F.dropout``'s (kept with probability ``1 - p``,
scaled so the expectation is unchanged), from other random numbers. On other devices (CUDA's
dropout is a fused kernel) and outside training it is ``F.dropout``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """``F.dropout(x, p, training)`` in distribution; on a CPU the mask is ``rand >= p``."""
    if not training or p == 0.0 or x.device.type != "cpu" or p >= 1.0 or not x.is_floating_point():
        return F.dropout(x, p, training)
    keep = torch.rand(x.shape, device=x.device).ge_(p).mul_(1.0 / (1.0 - p))  # (x.shape) 0 or 1/(1-p)
    return x * keep.to(x.dtype)


class Dropout(nn.Dropout):
    """``nn.Dropout`` through :func:`dropout` (same ``p``, same state: none)."""

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)
