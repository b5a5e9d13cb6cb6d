"""Span masking for masked prediction (wav2vec 2.0, HuBERT, WavLM, data2vec, AV-HuBERT).

``mask_prob`` sets how many spans start: ``mask_prob * n / span`` of an utterance's ``n``
frames are span starts (wav2vec 2.0, sec. 4.2: a proportion p = 0.065 of the frames start a
span of M = 10; the released configs write it ``mask_prob=0.65`` and divide by the span, which
we follow, so about 49% of the frames end up masked once overlaps are counted). Spans are
``span`` frames long and may overlap, every utterance gets at least ``min_masks`` spans,
and, as fairseq's ``require_same_masks`` (on by default in ``compute_mask_indices``, which
wav2vec 2.0, HuBERT and data2vec call), every utterance of a batch ends up with the same
number of masked frames: each row is trimmed at random to the *smallest* count of the batch,
so a masked-frame loss is not dominated by long utterances. Masks never touch padding.

The equalisation lowers the masked fraction below the ~49% of one utterance alone: measured
over 200 seeds at ``mask_prob=0.65, span=10``, one 500-frame utterance masks 49.3%, a batch
of 8 equal 500-frame utterances 44.8% (the minimum of 8 draws), and a batch of 500 / 250 /
100 frames masks 10% / 20% / 50% of each (every row keeps the 100-frame row's ~50 frames).
Batches bucketed by length keep the fraction near the paper's; ``same_count=False`` keeps
each utterance's own count.

Everything is vectorised torch, so the same code runs in data workers (``SpanMasker``) or on
the device inside an objective's ``forward`` when no worker made the mask.

Shape legend: B batch, T frames, S samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mmssl.errors import ConfigError, DataError
from mmssl.nn.outputs import FrameSpec
from mmssl.nn.padding import lengths_to_padding_mask


def _rank_within_row(scores: Tensor) -> Tensor:
    """Rank (0 = smallest) of every entry of ``scores (B, T)`` within its row."""
    order = scores.argsort(dim=1)
    ranks = torch.empty_like(order)
    steps = torch.arange(scores.shape[1], device=scores.device).expand_as(order)
    return ranks.scatter_(1, order, steps)


def _check(mask_prob: float, span: int, min_masks: int) -> None:
    if not 0.0 <= mask_prob <= 1.0 * span:
        raise ConfigError(f"mask_prob must be in [0, span]; got {mask_prob}")
    if span < 1:
        raise ConfigError(f"mask span must be >= 1 frame; got {span}")
    if min_masks < 0:
        raise ConfigError(f"min_masks must be >= 0; got {min_masks}")


def compute_span_mask(
    lengths: Tensor,
    max_len: int,
    mask_prob: float,
    span: int,
    min_masks: int = 2,
    generator: torch.Generator | None = None,
    same_count: bool = True,
) -> Tensor:
    """Span mask ``(B, T=max_len)``, True = masked for prediction.

    ``lengths (B,)`` valid frames per utterance. Each utterance of ``n`` frames draws
    ``floor(mask_prob * n / span + u)`` span starts (``u ~ U(0, 1)``, at least ``min_masks``)
    without replacement among its ``n - span + 1`` possible starts; spans may overlap. With
    ``same_count`` (the default, and what ``SpanMasker`` uses) every non-empty utterance then
    keeps a random subset of its masked frames so that all have the batch's smallest count
    (fairseq ``require_same_masks``): the fraction masked in the longer utterances of a
    mixed-length batch drops well below ~49% (see the module docstring). An utterance of at
    most ``span`` frames gets one span of ``n - 1`` frames, and the last frame of an utterance
    is left visible whenever spans would cover all of it, so every utterance keeps some context.
    ``generator`` must live on ``lengths.device``.
    """
    _check(mask_prob, span, min_masks)
    device = lengths.device
    lengths = lengths.long().clamp(max=max_len)
    batch = lengths.shape[0]
    if batch == 0 or max_len == 0:
        return torch.zeros(batch, max_len, dtype=torch.bool, device=device)
    # a span never covers a whole utterance: short ones get spans of n - 1 frames
    row_span = lengths.clamp(min=1).sub(1).clamp(max=span).clamp(min=1)  # (B,)
    n_starts = (lengths - row_span + 1).clamp(min=0)  # (B,)
    draw = torch.rand(batch, device=device, generator=generator)
    n_spans = torch.floor(mask_prob * lengths.float() / span + draw).long()
    n_spans = n_spans.clamp(min=min_masks).minimum(n_starts)
    n_spans = torch.where(lengths > span, n_spans, n_spans.clamp(max=1))
    n_spans = torch.where(lengths > 1, n_spans, torch.zeros_like(n_spans))

    steps = torch.arange(max_len, device=device)
    can_start = steps.unsqueeze(0) < n_starts.unsqueeze(1)  # (B, T)
    scores = torch.rand(batch, max_len, device=device, generator=generator)
    scores = torch.where(can_start, scores, torch.full_like(scores, 2.0))
    starts = (_rank_within_row(scores) < n_spans.unsqueeze(1)) & can_start  # (B, T)

    # frame t is masked when a span started in (t - row_span, t]
    counts = starts.long().cumsum(1)
    behind = steps.unsqueeze(0) - row_span.unsqueeze(1)  # (B, T)
    before = torch.where(behind >= 0, counts.gather(1, behind.clamp(min=0)), torch.zeros_like(counts))
    mask = (counts - before) > 0
    mask &= ~lengths_to_padding_mask(lengths, max_len)
    full = mask.sum(1) >= lengths  # (B,) spans cover the whole utterance
    last = steps.unsqueeze(0) == (lengths - 1).unsqueeze(1)
    mask &= ~(last & full.unsqueeze(1))
    if same_count:
        mask = equalize_mask_counts(mask, lengths, generator)
    return mask


def equalize_mask_counts(mask: Tensor, lengths: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Keep a random subset of each row's masked frames so that every non-empty utterance has
    the batch's smallest count (fairseq ``require_same_masks``). ``mask (B, T)``; utterances of
    at most one frame are never masked and do not count."""
    counts = mask.sum(1)
    big = torch.full_like(counts, mask.shape[1] + 1)
    target = torch.where(lengths > 1, counts, big).min()  # 0- and 1-frame rows get no mask
    scores = torch.rand(mask.shape, device=mask.device, generator=generator)
    scores = torch.where(mask, scores, torch.full_like(scores, 2.0))
    return mask & (_rank_within_row(scores) < target)


def hook_generator(salt: int = 0) -> torch.Generator:
    """A fresh CPU generator for one call of a batch hook.

    Seeded from one draw of the global generator, which the batch stream seeds from the
    batch's position (seed, rank, epoch, index; ``mmssl.train.stream``), and from ``salt`` (a
    hook's own ``seed`` option). What a hook draws is then a pure function of the batch
    position: the same with any number of data workers and in a resumed run. Each call moves
    the global generator on, so hooks chained on one batch draw different streams.
    """
    draw = int(torch.randint(0, 2**62, (), dtype=torch.long))
    return torch.Generator().manual_seed(hash((draw, int(salt))) & (2**63 - 1))


@dataclass
class SpanMasker:
    """Batch hook that adds ``pred_mask (B, T)`` (bool, True = masked) to a collated batch.

    Frames are counted with ``frame_spec`` from ``audio_lens`` and from the padded width of
    ``audio``, so ``pred_mask`` has exactly the encoder's frame count. Picklable and
    stateless: every call draws from ``hook_generator(seed)``, so the mask of a batch depends
    only on the position the batch stream seeded, not on the worker or on earlier batches.

    Masks are equalised across the batch (``compute_span_mask(same_count=True)``, fairseq
    ``require_same_masks``): every utterance gets the batch's smallest masked count, so long
    utterances batched with short ones are masked far less than ~49%.
    """

    frame_spec: FrameSpec
    mask_prob: float
    span: int
    min_masks: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.mask_prob, self.span, self.min_masks)

    def __call__(self, batch: dict) -> dict:
        audio_lens = batch["audio_lens"]
        frames = self.frame_spec(audio_lens)
        max_len = int(self.frame_spec(torch.tensor(batch["audio"].shape[1])))
        batch["pred_mask"] = compute_span_mask(
            frames.cpu(), max_len, self.mask_prob, self.span, self.min_masks, hook_generator(self.seed)
        )
        return batch


def prediction_mask(batch: dict, masker: SpanMasker, lengths: Tensor, frames: int) -> Tensor:
    """``pred_mask (B, T)`` from the batch hook, or made here (on the device) when the batch
    has none; checked against the encoder's frame count, restricted to valid frames."""
    pred_mask = batch.get("pred_mask")
    if pred_mask is None:
        pred_mask = compute_span_mask(lengths, frames, masker.mask_prob, masker.span, masker.min_masks)
    elif pred_mask.shape != (lengths.shape[0], frames):
        raise DataError(
            f"batch 'pred_mask' has shape {tuple(pred_mask.shape)} but the encoder gives "
            f"({lengths.shape[0]}, {frames}) frames: the mask hook and the encoder disagree"
        )
    pred_mask = pred_mask.to(lengths.device, non_blocking=True)
    return pred_mask & ~lengths_to_padding_mask(lengths, frames)
