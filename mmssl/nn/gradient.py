"""Gradient scaling: identity forward, gradient multiplied by a constant on the way back
(fairseq ``GradMultiply``, behind ``feature_grad_mult``: the frontend of wav2vec 2.0, HuBERT
and AV-HuBERT learns 10x slower than the rest at 0.1)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


def scale_grad(x: Tensor, scale: float) -> Tensor:
    """``x`` unchanged; its gradient is multiplied by ``scale`` in backward. No-op (the same
    tensor) when ``scale == 1`` or gradients are off."""
    if scale == 1.0 or not torch.is_grad_enabled():
        return x
    return _ScaleGrad.apply(x, scale)
