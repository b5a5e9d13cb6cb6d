"""The one padding helper: lengths in, mask out (True = padded); and the statistics over
valid frames built on it (``masked_mean``, ``instance_norm``)."""

from __future__ import annotations

import torch
from torch import Tensor


def lengths_to_padding_mask(lengths: Tensor, max_len: int | None = None) -> Tensor:
    """``lengths (B,)`` -> ``(B, T)`` bool mask, True where a frame is padding.

    ``max_len`` defaults to ``lengths.max()``; pass it when the padded size is known, which
    avoids a host sync on CUDA.
    """
    if max_len is None:
        max_len = int(lengths.max()) if lengths.numel() else 0
    steps = torch.arange(max_len, device=lengths.device)
    return steps.unsqueeze(0) >= lengths.unsqueeze(1)


def masked_mean(x: Tensor, lengths: Tensor) -> Tensor:
    """Mean over time of ``x (B, T, C)`` counting only the first ``lengths`` frames -> ``(B, C)``."""
    keep = ~lengths_to_padding_mask(lengths, x.shape[1])
    total = (x * keep.unsqueeze(-1).to(x.dtype)).sum(1)
    return total / lengths.clamp(min=1).unsqueeze(-1).to(x.dtype)


def instance_norm(x: Tensor, lengths: Tensor, eps: float = 1e-5) -> Tensor:
    """Normalise ``x (B, T, C)`` to zero mean and unit variance over the first ``lengths (B,)``
    frames of each utterance, per channel (``F.instance_norm`` without affine, with the
    padding left out of the statistics); padded frames come out zero. Computed and returned
    in float32."""
    x = x.float()
    keep = (~lengths_to_padding_mask(lengths, x.shape[1])).unsqueeze(-1).float()  # (B, T, 1)
    count = keep.sum(1, keepdim=True).clamp(min=1.0)  # (B, 1, 1)
    mean = (x * keep).sum(1, keepdim=True) / count  # (B, 1, C)
    var = ((x - mean).pow(2) * keep).sum(1, keepdim=True) / count
    return (x - mean) * torch.rsqrt(var + eps) * keep
