"""All-gather with gradients, for contrastive negatives drawn from every rank.

Each rank's loss sees the embeddings of all ranks; the backward pass sums, over ranks, the
gradient each loss sends to a rank's embeddings, and hands every rank the part for its own
rows. With DDP averaging parameter gradients, the result is the gradient of the mean loss over
ranks, the same as one process computing the loss on the combined batch (open_clip
``gather_features`` with ``gather_with_grad=True`` and ``local_loss=False``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, rank: int, world_size: int) -> Tensor:  # type: ignore[override]
        ctx.rank, ctx.world_size, ctx.rows = rank, world_size, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        grad = grad.contiguous()
        # every rank's loss sends gradient to every rank's rows: sum them, keep our rows
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.rows
        return grad[start : start + ctx.rows], None, None


def gather_with_grad(x: Tensor, rank: int, world_size: int) -> Tensor:
    """``x (B, ...)`` on each rank -> ``(world_size * B, ...)``, rank order, differentiable.

    Every rank must pass the same ``B`` (pad and carry a validity mask otherwise). With
    ``world_size == 1`` this returns ``x`` itself and needs no process group.
    """
    if world_size == 1:
        return x
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("gather_with_grad with world_size > 1 needs an initialised process group")
    return _GatherWithGrad.apply(x, rank, world_size)


def gather_no_grad(x: Tensor, world_size: int) -> Tensor:
    """``x (B, ...)`` -> ``(world_size * B, ...)`` without gradient (labels, masks, lengths)."""
    if world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)
