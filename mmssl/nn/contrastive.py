"""Symmetric InfoNCE of paired embeddings (CLIP, Radford et al., 2021, fig. 3), with negatives
from every rank and optional groups of rows that are not negatives of each other.

Row ``i`` of ``x`` and row ``i`` of ``y`` are a positive pair; every other row of the global
batch (all ranks' rows, gathered with gradients by ``mmssl.nn.gather``) is a negative, except
the rows that share row ``i``'s group: several spoken captions of one image in a batch carry
the same image, so each of those other pairs is neither the positive nor a fair negative. Their
logits are set to ``-inf`` in both directions (the positive itself is always kept).

Shape legend: B local rows, N rows of all ranks, D embedding dim.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from mmssl.nn.gather import gather_no_grad, gather_with_grad_and_offset

# ``(x, rank, world_size) -> (every rank's rows in rank order, offset of this rank's rows)``
Gather = Callable[[Tensor, int, int], tuple[Tensor, int]]
GatherNoGrad = Callable[[Tensor, int], Tensor]


def same_group_mask(groups: Tensor, all_groups: Tensor, offset: int) -> Tensor:
    """``groups (B,)``, ``all_groups (N,)`` integer ids -> ``(B, N)`` bool, True where column
    ``j`` shares row ``i``'s group but is not its positive (column ``i + offset``)."""
    same = groups.unsqueeze(1) == all_groups.unsqueeze(0)
    columns = torch.arange(all_groups.shape[0], device=groups.device)
    positive = columns.unsqueeze(0) == (torch.arange(groups.shape[0], device=groups.device) + offset).unsqueeze(1)
    return same & ~positive


def symmetric_info_nce(
    x: Tensor,
    y: Tensor,
    scale: Tensor,
    groups: Tensor | None = None,
    rank: int = 0,
    world_size: int = 1,
    gather: Gather = gather_with_grad_and_offset,
    gather_ids: GatherNoGrad = gather_no_grad,
) -> tuple[Tensor, Tensor, Tensor]:
    """CLIP's loss on normalised ``x (B, D)`` and ``y (B, D)`` against every rank's rows.

    ``scale``: the logit scale (``1 / temperature``). ``groups (B,)``: integer ids; rows of one
    group are not negatives of each other (None: every other row is a negative). ``B`` may
    differ between ranks. Returns ``(loss, accuracy_xy, accuracy_yx)``: the mean of the x->y
    and y->x cross-entropies over the local rows, and the fraction of local rows whose top
    logit (x->y, y->x) is the positive. With ``world_size`` ranks of equal ``B``, the mean of
    the ranks' losses is the loss of one process on the combined batch (and so are DDP's
    averaged gradients).
    """
    d = x.shape[1]
    # both sides in one gather: one size exchange and one all_gather instead of two each
    all_xy, offset = gather(torch.cat([x, y], dim=1), rank, world_size)  # (N, 2D)
    all_x, all_y = all_xy[:, :d], all_xy[:, d:]
    labels = torch.arange(x.shape[0], device=x.device) + offset
    logits_xy = (scale * x @ all_y.T).float()  # (B, N)
    logits_yx = (scale * y @ all_x.T).float()
    if groups is not None:
        excluded = same_group_mask(groups, gather_ids(groups, world_size), offset)
        logits_xy = logits_xy.masked_fill(excluded, float("-inf"))
        logits_yx = logits_yx.masked_fill(excluded, float("-inf"))
    loss = 0.5 * (F.cross_entropy(logits_xy, labels) + F.cross_entropy(logits_yx, labels))
    acc_xy = (logits_xy.argmax(-1) == labels).float().mean()
    acc_yx = (logits_yx.argmax(-1) == labels).float().mean()
    return loss, acc_xy.detach(), acc_yx.detach()
