"""All-gather with gradients, for contrastive negatives drawn from every rank.

Each rank's loss sees the embeddings of all ranks; the backward pass sums, over ranks, the
gradient each loss sends to a rank's embeddings, and hands every rank the part for its own
rows. With DDP averaging parameter gradients, the result is the gradient of the mean loss over
ranks, the same as one process computing the loss on the combined batch when every rank has
the same batch size (open_clip ``gather_features`` with ``gather_with_grad=True`` and
``local_loss=False``).

Ranks may hold different numbers of rows (the duration-bucketed sampler gives each rank its own
``B``): the sizes are all-gathered first, every rank pads its rows to the largest ``B`` for the
equal-shape ``all_gather``, and only the valid rows of each rank are kept, in rank order. Slicing
by the gathered sizes needs them on the host, so a call with ``world_size > 1`` costs one small
extra collective and one device-to-host sync; ``world_size == 1`` costs nothing.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def _require_group(name: str) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{name} with world_size > 1 needs an initialised process group")


def gather_sizes(x: Tensor, world_size: int) -> list[int]:
    """Every rank's ``x.shape[0]``, in rank order (a collective; one host sync)."""
    if world_size == 1:
        return [x.shape[0]]
    mine = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    parts = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(parts, mine)
    return torch.cat(parts).tolist()  # host sync: the sizes decide the slices below


def _gather_padded(x: Tensor, sizes: list[int]) -> Tensor:
    """All-gather ``x`` padded to ``max(sizes)`` rows; the concatenated valid rows."""
    x = x.contiguous()
    longest = max(sizes)
    if x.shape[0] < longest:
        x = torch.cat([x, x.new_zeros((longest - x.shape[0], *x.shape[1:]))])
    parts = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(parts, x)
    if all(n == longest for n in sizes):
        return torch.cat(parts, dim=0)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)], dim=0)


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, offset: int, sizes: list[int]) -> Tensor:  # type: ignore[override]
        ctx.offset, ctx.rows = offset, x.shape[0]
        return _gather_padded(x, sizes)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        # every rank's loss sends gradient to every rank's rows: sum them, keep our rows.
        # ``grad`` has the same (sum of sizes) rows on every rank, so no padding is needed.
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.offset : ctx.offset + ctx.rows], None, None


def gather_with_grad_and_sizes(x: Tensor, rank: int, world_size: int) -> tuple[Tensor, list[int]]:
    """``x (B_r, ...)`` on each rank ``r`` -> ``(all_rows (sum_r B_r, ...), sizes)``: every
    rank's rows in rank order, differentiable (the gradient of this rank's slice flows back to
    ``x``; see the module docstring), and every rank's ``B_r``, so that more tensors of the same
    rows (ids, labels) can be gathered with :func:`gather_no_grad` without another size exchange.
    ``B_r`` may differ between ranks (the trailing dimensions may not). With ``world_size > 1``
    this costs a size all-gather and one host sync; with ``world_size == 1`` it returns
    ``(x, [B])`` and needs no process group.
    """
    if world_size == 1:
        return x, [x.shape[0]]
    _require_group("gather_with_grad")
    sizes = gather_sizes(x, world_size)
    return _GatherWithGrad.apply(x, sum(sizes[:rank]), sizes), sizes


def gather_with_grad_and_offset(x: Tensor, rank: int, world_size: int) -> tuple[Tensor, int]:
    """``x (B_r, ...)`` on each rank ``r`` -> ``(all_rows (sum_r B_r, ...), offset)``, as
    :func:`gather_with_grad_and_sizes`; ``offset`` is where this rank's rows start in
    ``all_rows``, ``sum(B_s for s < rank)``, e.g. for the positive labels of a contrastive loss."""
    rows, sizes = gather_with_grad_and_sizes(x, rank, world_size)
    return rows, sum(sizes[:rank])


def gather_with_grad(x: Tensor, rank: int, world_size: int) -> Tensor:
    """``x (B_r, ...)`` on each rank -> ``(sum_r B_r, ...)``, rank order, differentiable.

    With equal ``B`` on every rank this is ``(world_size * B, ...)``. Use
    :func:`gather_with_grad_and_offset` to also get where this rank's rows start. With
    ``world_size == 1`` this returns ``x`` itself and needs no process group.
    """
    return gather_with_grad_and_offset(x, rank, world_size)[0]


def gather_no_grad(x: Tensor, world_size: int, sizes: list[int] | None = None) -> Tensor:
    """``x (B_r, ...)`` -> ``(sum_r B_r, ...)`` in rank order, without gradient (labels, masks,
    lengths). ``B_r`` may differ between ranks: one size all-gather and host sync per call,
    unless ``sizes`` (from :func:`gather_with_grad_and_sizes` on the same rows) is given."""
    if world_size == 1:
        return x
    _require_group("gather_no_grad")
    return _gather_padded(x.detach(), sizes if sizes is not None else gather_sizes(x, world_size))
