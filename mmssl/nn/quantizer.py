"""Quantizers that turn continuous frames into discrete codes.

``GumbelProductQuantizer``: the product quantizer of wav2vec 2.0 (Baevski et al., 2020,
sec. 2 and 3.2): G codebooks ("groups") of V entries; a linear layer scores every entry, a
straight-through hard Gumbel softmax picks one entry per group during training (argmax at
evaluation), and the picked entries are concatenated. The Gumbel temperature is annealed from
2 to 0.5 by a factor 0.999995 per update (sec. 4.2), driven from ``set_step``.

``VectorQuantizer``: the VQ-VAE bottleneck (van den Oord et al., 2017, "Neural discrete
representation learning", sec. 3.1-3.2): each frame takes its nearest codebook entry, the
gradient is copied straight through, and the codebook and commitment losses pull entries and
encoder outputs together; optionally the codebook follows exponential moving averages of its
assigned frames (appendix A.1) and unused entries are restarted on frames of the batch
(random restarts, Dhariwal et al., 2020, "Jukebox"). It returns a ``VQOutput``.

Shape legend: B batch, T frames, F input features, D code dimension, G groups, V / K entries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from mmssl.errors import ConfigError
from mmssl.nn.padding import lengths_to_padding_mask


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


USAGE_DECAY = 0.99  # moving average of entry counts for restarts when the codebook has no EMA


@dataclass
class VQOutput:
    """``quantized (B, T, D)``: the chosen entries, with the straight-through gradient (its
    gradient reaches the input unchanged); ``codes (B, T)`` entry index per frame;
    ``loss`` () what to add to the training loss: ``codebook_loss + beta * commitment_loss``
    (the codebook term left out when EMA updates move the codebook); ``codebook_loss`` ()
    ``||sg[z] - e||^2`` and ``commitment_loss`` () ``||z - sg[e]||^2``, both mean squared errors
    over valid frames and dimensions; ``perplexity`` () ``exp(entropy)`` of the batch's code
    distribution; ``usage`` () fraction of the K entries used by at least one valid frame."""

    quantized: Tensor
    codes: Tensor
    loss: Tensor
    codebook_loss: Tensor
    commitment_loss: Tensor
    perplexity: Tensor
    usage: Tensor


class VectorQuantizer(nn.Module):
    """Nearest-entry vector quantizer: ``z (B, T, D)``, ``lengths (B,)`` -> ``VQOutput``.

    ``entries`` K = 512 and ``beta`` = 0.25 as in VQ-VAE (sec. 4.1 and 3.2). With ``ema_decay``
    (0.99 in appendix A.1) the codebook is a buffer updated in training as
    ``N_i <- g N_i + (1 - g) n_i``, ``m_i <- g m_i + (1 - g) sum_j z_ij``, ``e_i = m_i / N_i``,
    with ``N`` Laplace-smoothed by ``epsilon`` (``(N_i + eps) / (sum N + K eps) * sum N``, as
    Sonnet's ``VectorQuantizerEMA``); without it the codebook is a parameter trained by the
    codebook loss. ``restart_threshold`` > 0 replaces, in training, every entry whose moving
    average count ``N_i`` (tracked in both modes; decay ``USAGE_DECAY`` without EMA) falls
    below it by a random valid frame of the batch (Jukebox's random restarts; 1.0 restarts
    entries picked less than once per update on average). ``world_size`` > 1 sums the counts
    across ranks and takes rank 0's restarts, so every rank keeps the same codebook.
    Padded frames never reach a loss, a count or a restart; a batch with a non-finite valid
    frame changes no buffer (its loss is non-finite and the trainer skips the step).
    """

    def __init__(
        self,
        dim: int,
        entries: int = 512,
        beta: float = 0.25,
        ema_decay: float | None = None,
        epsilon: float = 1e-5,
        restart_threshold: float = 0.0,
        world_size: int = 1,
    ) -> None:
        super().__init__()
        if entries < 2 or dim < 1:
            raise ConfigError(f"vector quantizer: need entries >= 2 and dim >= 1; got {entries}, {dim}")
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ConfigError(f"vector quantizer: ema_decay must be in (0, 1) or null; got {ema_decay}")
        self.dim, self.entries, self.beta = dim, entries, beta
        self.ema_decay, self.epsilon = ema_decay, epsilon
        self.restart_threshold, self.world_size = restart_threshold, world_size
        # small uniform entries (+-1/K); with restarts on, unused ones soon move onto real frames
        init = torch.empty(entries, dim).uniform_(-1.0 / entries, 1.0 / entries)
        if ema_decay is None:
            self.codebook = nn.Parameter(init)
        else:
            self.register_buffer("codebook", init)
            self.register_buffer("ema_sum", init.clone())  # m_i
        # N_i: every entry starts as if it had been picked once, so e_i = m_i / N_i holds at step 0
        self.register_buffer("cluster_size", torch.ones(entries))

    @property
    def uses_ema(self) -> bool:
        return self.ema_decay is not None

    def assign(self, z: Tensor) -> Tensor:
        """``z (..., D)`` -> ``codes (...)``: index of the nearest entry in squared Euclidean
        distance ``||z||^2 - 2 z.e + ||e||^2`` (float32, no gradient)."""
        with torch.no_grad():
            flat = z.detach().float().reshape(-1, self.dim)  # (N, D)
            book = self.codebook.detach().float()  # (K, D)
            dist2 = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ book.T + book.pow(2).sum(1)  # (N, K)
            return dist2.argmin(1).view(z.shape[:-1])

    def lookup(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``z (B, T, D)`` -> (``quantized (B, T, D)`` with the straight-through gradient,
        ``codes (B, T)``); no loss, and the codebook never moves (features for downstream use)."""
        codes = self.assign(z)
        picked = F.embedding(codes, self.codebook).to(z.dtype)
        return z + (picked - z).detach(), codes

    def forward(self, z: Tensor, lengths: Tensor) -> VQOutput:
        """``z (B, T, D)``, ``lengths (B,)``."""
        if z.shape[-1] != self.dim:
            raise ValueError(f"vector quantizer: input has {z.shape[-1]} features, expected {self.dim}")
        valid = ~lengths_to_padding_mask(lengths, z.shape[1])  # (B, T)
        codes = self.assign(z)  # (B, T)
        picked = F.embedding(codes, self.codebook).to(z.dtype)  # (B, T, D): e, gradient to the codebook
        w = valid.unsqueeze(-1).to(torch.float32)
        count = (w.sum() * self.dim).clamp(min=1.0)
        keep = valid.unsqueeze(-1)  # (B, T, 1): selecting (not multiplying) keeps NaN padding out
        codebook_loss = torch.where(keep, z.detach().float() - picked.float(), 0.0).pow(2).sum() / count
        commitment_loss = torch.where(keep, z.float() - picked.detach().float(), 0.0).pow(2).sum() / count
        loss = self.beta * commitment_loss + (0.0 if self.uses_ema else codebook_loss)
        entries = torch.arange(self.entries, device=codes.device)
        onehot = (codes.unsqueeze(-1) == entries).float() * w  # (B, T, K), zero on padding
        counts = onehot.sum((0, 1))  # (K,)
        if self.training:
            self._update(onehot, counts, z, valid)
        quantized = z + (picked - z).detach()  # straight-through (VQ-VAE, sec. 3.1)
        return VQOutput(
            quantized=quantized,
            codes=codes,
            loss=loss,
            codebook_loss=codebook_loss.detach(),
            commitment_loss=commitment_loss.detach(),
            perplexity=batch_perplexity(onehot.unsqueeze(2), valid.float()),
            usage=(counts > 0).float().mean(),
        )

    @torch.no_grad()
    def _update(self, onehot: Tensor, counts: Tensor, z: Tensor, valid: Tensor) -> None:
        """Moving-average counts (and codebook, with EMA), then dead-entry restarts.

        A batch with a non-finite valid frame (on any rank) leaves every buffer as it was: the
        trainer skips such a step, and one NaN in the moving averages or a restart would spoil
        the codebook for every later batch. Chosen with ``torch.where``, no host sync."""
        flat_z = z.detach().float().reshape(-1, self.dim)  # (N, D)
        finite = torch.isfinite(flat_z).all(1)  # (N,)
        usable = valid.reshape(-1) & finite  # (N,) frames that may reach a statistic
        flat_z = torch.where(usable.unsqueeze(1), flat_z, 0.0)  # 0 * NaN would still be NaN
        bad = (valid.reshape(-1) & ~finite).sum().float()  # valid frames that are not finite
        sums = onehot.reshape(-1, self.entries).T @ flat_z  # (K, D): sum of frames per entry
        if self.world_size > 1:
            stats = torch.cat([counts, bad.view(1)])  # one reduction: counts and bad frames
            dist.all_reduce(stats, op=dist.ReduceOp.SUM)
            counts, bad = stats[:-1], stats[-1]
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        ok = bad == 0  # () bool
        decay = self.ema_decay if self.uses_ema else USAGE_DECAY
        size = self.cluster_size * decay + counts * (1 - decay)
        if self.uses_ema:
            ema_sum = self.ema_sum * decay + sums * (1 - decay)
            total = size.sum()
            smoothed = (size + self.epsilon) / (total + self.entries * self.epsilon) * total
            self.ema_sum.copy_(torch.where(ok, ema_sum, self.ema_sum))
            self.codebook.copy_(torch.where(ok, ema_sum / smoothed.unsqueeze(1), self.codebook))
        self.cluster_size.copy_(torch.where(ok, size, self.cluster_size))
        if self.restart_threshold > 0:
            self._restart(flat_z, usable, ok)

    def _restart(self, flat_z: Tensor, usable: Tensor, ok: Tensor) -> None:
        """Entries with ``cluster_size < restart_threshold`` take random ``usable`` frames (valid
        and finite); their count restarts at the threshold (and their EMA sum at frame *
        threshold). Nothing moves unless ``ok`` and some frame is usable."""
        count = usable.sum()
        dead = ((self.cluster_size < self.restart_threshold) & ok & (count > 0)).unsqueeze(1)  # (K, 1)
        # K uniform draws among the usable frames, with no host sync: usable frames first, then
        # a random rank below their count
        order = torch.argsort((~usable).to(torch.uint8), stable=True)  # (N,) usable frames first
        rank = torch.minimum(
            (torch.rand(self.entries, device=flat_z.device) * count).long(), count - 1
        ).clamp(min=0)
        candidates = flat_z[order[rank]].to(self.codebook.dtype)  # (K, D)
        if self.world_size > 1:
            dist.broadcast(candidates, src=0)
        self.codebook.copy_(torch.where(dead, candidates, self.codebook))
        self.cluster_size.copy_(
            torch.where(
                dead.squeeze(1), torch.full_like(self.cluster_size, self.restart_threshold), self.cluster_size
            )
        )
        if self.uses_ema:
            self.ema_sum.copy_(torch.where(dead, candidates * self.restart_threshold, self.ema_sum))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, entries={self.entries}, beta={self.beta}, ema_decay={self.ema_decay}, "
            f"restart_threshold={self.restart_threshold}"
        )
