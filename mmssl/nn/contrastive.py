"""Contrastive losses shared by the objectives.

Frame-level InfoNCE against sampled distractors (CPC, wav2vec, wav2vec 2.0):
``sample_negatives`` draws K distractor frames per anchor from the anchor's own utterance with
device ops only, ``gather_logits`` scores the positive and the distractors (dot product or
cosine over a temperature) and ``info_nce`` is the cross-entropy with the positive first.

Symmetric InfoNCE of paired embeddings (CLIP, Radford et al., 2021, fig. 3), with negatives
from every rank and optional groups of rows that are not negatives of each other, and CLIP's
learnable logit scale.

Row ``i`` of ``x`` and row ``i`` of ``y`` are a positive pair; every other row of the global
batch (all ranks' rows, gathered with gradients) is a negative, except the rows that share row
``i``'s group: several spoken captions of one image in a batch carry the same image, so each of
those other pairs is neither the positive nor a fair negative. Their logits are set to ``-inf``
in both directions (the positive itself is always kept).

Gathering is split from scoring so an objective with several InfoNCE terms over the same rows
(speech-image and speech-caption) gathers every side once: ``gather_rows`` exchanges the
ranks' row counts once and returns them, ``gather_ids`` reuses those counts for the group ids,
and ``pair_info_nce`` scores already-gathered columns.

Shape legend: B local rows (or batch), N rows of all ranks (or negatives per anchor), D embedding
dim, T frames, A anchors.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmssl.errors import ConfigError
from mmssl.nn import gather as _gather

# ``(x, rank, world_size) -> (every rank's rows in rank order, every rank's row count)``
Gather = Callable[[Tensor, int, int], tuple[Tensor, list[int]]]
# ``(ids, sizes) -> every rank's ids in rank order`` (no gradient), with the counts of a ``Gather``
GatherIds = Callable[[Tensor, list[int]], Tensor]

# CLIP (Radford et al., 2021, sec. 2.5): temperature initialised at 0.07, logit scale clipped at 100
INIT_TEMPERATURE = 0.07
MAX_LOGIT_SCALE = 100.0


class LogitScale(nn.Module):
    """A learnable ``log(1 / temperature)`` (CLIP, sec. 2.5). ``forward()`` gives ``exp(.)``,
    clamped at ``max_scale``; ``clamp_()`` clamps the parameter itself to ``[0, log max_scale]``
    and must run after every optimizer step (open_clip's training loop does the same): a clamp
    only in ``forward`` has no gradient above the cap, so a parameter pushed past it would never
    come back. The forward clamp stays as a guard for loops that skip ``clamp_``; at the cap
    itself its gradient passes (``clamp``'s bounds are inclusive)."""

    def __init__(
        self, init_temperature: float = INIT_TEMPERATURE, max_scale: float = MAX_LOGIT_SCALE
    ) -> None:
        super().__init__()
        if init_temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {init_temperature}")
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.max_log = math.log(max_scale)

    def forward(self) -> Tensor:
        return self.log_scale.clamp(max=self.max_log).exp()

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamp ``log_scale`` in place to ``[0, log max_scale]`` (after an optimizer step)."""
        self.log_scale.clamp_(0.0, self.max_log)


def gather_rows(x: Tensor, rank: int, world_size: int) -> tuple[Tensor, list[int]]:
    """``x (B_r, ...)`` on each rank -> ``(all rows (N, ...), sizes)``: every rank's rows in rank
    order, differentiable (``mmssl.nn.gather``), and every rank's ``B_r``. One size exchange
    and one host sync with ``world_size > 1``; nothing with one process."""
    return _gather.gather_with_grad_and_sizes(x, rank, world_size)


def gather_ids(ids: Tensor, sizes: list[int]) -> Tensor:
    """``ids (B_r,)`` -> ``(N,)`` in rank order, without gradient, with the ``sizes`` of
    ``gather_rows`` (no second size exchange)."""
    return _gather.gather_no_grad(ids, len(sizes), sizes)


def same_group_mask(groups: Tensor, all_groups: Tensor, offset: int) -> Tensor:
    """``groups (B,)``, ``all_groups (N,)`` integer ids -> ``(B, N)`` bool, True where column
    ``j`` shares row ``i``'s group but is not its positive (column ``i + offset``)."""
    same = groups.unsqueeze(1) == all_groups.unsqueeze(0)
    columns = torch.arange(all_groups.shape[0], device=groups.device)
    positive = columns.unsqueeze(0) == (
        torch.arange(groups.shape[0], device=groups.device) + offset
    ).unsqueeze(1)
    return same & ~positive


def pair_info_nce(
    x: Tensor,
    y: Tensor,
    all_x: Tensor,
    all_y: Tensor,
    offset: int,
    scale: Tensor,
    excluded: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """CLIP's loss of local ``x (B, D)`` / ``y (B, D)`` against gathered ``all_x (N, D)`` /
    ``all_y (N, D)``, whose rows ``offset .. offset + B`` are the local ones. ``excluded (B, N)``:
    pairs left out of both directions (``same_group_mask``). Returns ``(loss, accuracy_xy,
    accuracy_yx)``: the mean of the x->y and y->x cross-entropies over the local rows, and the
    fraction of local rows whose top logit is the positive."""
    labels = torch.arange(x.shape[0], device=x.device) + offset
    logits_xy = (scale * x @ all_y.T).float()  # (B, N)
    logits_yx = (scale * y @ all_x.T).float()
    if excluded is not None:
        logits_xy = logits_xy.masked_fill(excluded, float("-inf"))
        logits_yx = logits_yx.masked_fill(excluded, float("-inf"))
    loss = 0.5 * (F.cross_entropy(logits_xy, labels) + F.cross_entropy(logits_yx, labels))
    acc_xy = (logits_xy.argmax(-1) == labels).float().mean()
    acc_yx = (logits_yx.argmax(-1) == labels).float().mean()
    return loss, acc_xy.detach(), acc_yx.detach()


def symmetric_info_nce(
    x: Tensor,
    y: Tensor,
    scale: Tensor,
    groups: Tensor | None = None,
    rank: int = 0,
    world_size: int = 1,
    gather: Gather = gather_rows,
    gather_group_ids: GatherIds = gather_ids,
) -> tuple[Tensor, Tensor, Tensor]:
    """CLIP's loss on normalised ``x (B, D)`` and ``y (B, D)`` against every rank's rows.

    ``scale``: the logit scale (``1 / temperature``). ``groups (B,)``: integer ids; rows of one
    group are not negatives of each other (None: every other row is a negative). ``B`` may
    differ between ranks. Returns ``(loss, accuracy_xy, accuracy_yx)`` as ``pair_info_nce``.
    With ``world_size`` ranks of equal ``B``, the mean of the ranks' losses is the loss of one
    process on the combined batch (and so are DDP's averaged gradients); with unequal ``B``,
    their mean weighted by ``B``.
    """
    d = x.shape[1]
    # both sides in one gather: one size exchange and one all_gather instead of two each
    all_xy, sizes = gather(torch.cat([x, y], dim=1), rank, world_size)  # (N, 2D)
    offset = sum(sizes[:rank])
    excluded = None
    if groups is not None:
        excluded = same_group_mask(groups, gather_group_ids(groups, sizes), offset)
    return pair_info_nce(x, y, all_xy[:, :d], all_xy[:, d:], offset, scale, excluded)


def sample_negatives(
    candidates: Tensor, positives: Tensor, num: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Draw ``num`` distractor frames per anchor, uniformly with replacement among the
    ``candidates (B, T)`` frames of the anchor's own utterance, never its positive frame.

    ``positives (B, A)``: the frame index of each anchor's positive (a candidate frame).
    Returns ``indices (B, A, N)`` into T and ``usable (B, A, N)``: False where the utterance has
    fewer than two candidates (no distractor exists). No host sync, no data-dependent shapes.
    """
    b, t = candidates.shape
    anchors = positives.shape[1]
    count = candidates.sum(1)  # (B,)
    # candidate frames first, in time order: position r of this list is the r-th candidate
    order = torch.sort((~candidates).to(torch.uint8), dim=1, stable=True).indices  # (B, T)
    rank = candidates.long().cumsum(1) - 1  # (B, T) rank of each candidate
    pos_rank = rank.gather(1, positives)  # (B, A)
    u = torch.rand(b, anchors, num, device=candidates.device, generator=generator)
    span = (count - 1).clamp(min=1).view(b, 1, 1).to(u.dtype)
    draw = torch.floor(u * span).long().clamp(max=t - 1)  # in [0, count - 2]
    draw = draw + (draw >= pos_rank.unsqueeze(-1)).long()  # skip the positive's own rank
    draw = draw.clamp(max=t - 1)
    indices = order.gather(1, draw.view(b, anchors * num)).view(b, anchors, num)
    usable = (count >= 2).view(b, 1, 1).expand(b, anchors, num)
    return indices, usable


def gather_logits(
    pred: Tensor,
    targets: Tensor,
    positives: Tensor,
    negatives: Tensor,
    temperature: float = 1.0,
    cosine: bool = False,
    exclude: Tensor | None = None,
) -> Tensor:
    """Logits ``(B, A, 1 + N)``: the positive first, then the negatives.

    ``pred (B, A, D)`` predictions, ``targets (B, T, D)`` candidate latents, ``positives (B, A)``
    and ``negatives (B, A, N)`` frame indices into T. Dot products (CPC) or cosine similarities
    (wav2vec 2.0), divided by ``temperature``. ``exclude (B, A, N)`` True sets a negative's
    logit to -inf (a distractor that does not exist, or equals the positive).
    """
    pred, targets = pred.float(), targets.float()
    if cosine:
        pred, targets = F.normalize(pred, dim=-1, eps=1e-6), F.normalize(targets, dim=-1, eps=1e-6)
    # float32 scores also under bf16 autocast (which would run bmm in bf16: ~3 digits on
    # logits of up to 1/temperature), as fairseq computes them from .float() inputs
    with torch.autocast(device_type=pred.device.type, enabled=False):
        sim = torch.bmm(pred, targets.transpose(1, 2)) / temperature  # (B, A, T)
    index = torch.cat([positives.unsqueeze(-1), negatives], dim=-1)  # (B, A, 1 + N)
    logits = sim.gather(2, index)
    if exclude is not None:
        keep = torch.cat([torch.zeros_like(exclude[..., :1]), exclude], dim=-1)
        logits = logits.masked_fill(keep, float("-inf"))
    return logits


def info_nce(logits: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Cross-entropy with the positive at index 0, averaged over anchors with ``weight (B, A)``
    (1 = counts, 0 = ignored). ``logits (B, A, 1 + N)`` -> (loss, accuracy), both scalars."""
    w = weight.to(logits.dtype)
    nll = -logits.log_softmax(-1)[..., 0]  # (B, A)
    total = w.sum().clamp(min=1.0)
    loss = (nll * w).sum() / total
    correct = (logits.argmax(-1) == 0).to(logits.dtype)
    return loss, (correct * w).sum() / total
