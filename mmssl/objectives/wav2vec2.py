"""wav2vec 2.0 (Baevski et al., 2020): contrastive prediction of quantized latents at masked frames.

The encoder's conv frontend gives latents; spans of them are masked (``SpanMasker``, run in
the data workers) and the transformer predicts, at each masked frame, which of 1 + K
quantized latents is the true one: the positive and K = 100 distractors drawn uniformly from
the *other* masked frames of the same utterance (sec. 3.2). Similarities are cosine over a
temperature of 0.1. The quantizer is a Gumbel product quantizer (G = 2, V = 320) on the
frontend features after the projection's LayerNorm (fairseq's ``layer_norm``, the same module)
and a dropout of their own (fairseq ``dropout_features``: 0.1 in the BASE recipe, 0 in LARGE),
not after the projection and input dropout the transformer reads; the diversity penalty pushes
its batch-averaged code distribution to uniform (weight 0.1, eq. 4).
fairseq quantizes only the masked frames (``unmasked_features[mask_indices]``), so that
average, and the reported perplexities, run over masked frames only: here every frame is
quantized (no data-dependent shapes) and the average is weighted by ``pred_mask``. An L2 penalty keeps the frontend outputs small (weight 10,
fairseq ``feature_pen``).

The step never syncs with the host: negatives are sampled with torch ops on the device, and
the contrastive loss is computed for every frame and weighted by the mask instead of picking
masked frames with a boolean index. Similarities come from one ``(B, T, T)`` matrix per batch
(each prediction against every latent of its utterance) gathered at the sampled indices,
which is far smaller than the ``(B, T, K, D)`` tensor of gathered negatives.

The helpers ``sample_negatives``, ``gather_logits``, ``info_nce`` and ``feature_penalty``
are shared with CPC / wav2vec (``mmssl.objectives.cpc``).

Shape legend: B batch, S samples, T frames, A anchors, N negatives, C model dim, D code dim.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mmssl.encoders  # noqa: F401  (registers the encoder presets)
from mmssl.encoders.base import SpeechEncoder
from mmssl.errors import ConfigError, DataError
from mmssl.nn.masking import SpanMasker, compute_span_mask
from mmssl.nn.padding import lengths_to_padding_mask
from mmssl.nn.quantizer import GumbelProductQuantizer, diversity_loss
from mmssl.objectives.base import BatchHook, Objective
from mmssl.registry import ENCODERS, OBJECTIVES


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


def feature_penalty(raw: Tensor, lengths: Tensor) -> Tensor:
    """Mean of ``raw (B, T, F) ** 2`` over valid frames and features (fairseq ``features_pen``)."""
    keep = (~lengths_to_padding_mask(lengths, raw.shape[1])).unsqueeze(-1).to(torch.float32)
    total = (raw.float().pow(2) * keep).sum()
    return total / (keep.sum() * raw.shape[-1]).clamp(min=1.0)


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


class Wav2Vec2Objective(Objective):
    """``forward(batch)`` reads ``audio (B, S)``, ``audio_lens (B,)`` and, when the batch hook
    ran, ``pred_mask (B, T)``. Parts: ``encoder`` (a ``SpeechEncoder``), ``quantizer`` on the
    normalised frontend features (``quantizer_norm``) after a dropout of ``dropout_features``,
    ``masker`` (its settings are used in forward when the batch has no mask)."""

    def __init__(
        self,
        encoder: SpeechEncoder,
        quantizer: GumbelProductQuantizer,
        masker: SpanMasker,
        quantizer_norm: nn.Module,
        final_dim: int,
        num_negatives: int = 100,
        temperature: float = 0.1,
        diversity_weight: float = 0.1,
        penalty_weight: float = 10.0,
        dropout_features: float = 0.1,
    ) -> None:
        super().__init__()
        if num_negatives < 1:
            raise ConfigError(f"wav2vec2: num_negatives must be >= 1, got {num_negatives}")
        if not 0.0 <= dropout_features < 1.0:
            raise ConfigError(f"wav2vec2: objective.dropout_features must be in [0, 1), got {dropout_features}")
        self.encoder, self.quantizer, self.masker = encoder, quantizer, masker
        self.quantizer_norm = quantizer_norm
        self.feature_dropout = nn.Dropout(dropout_features)  # fairseq ``dropout_features``
        self.project_q = nn.Linear(quantizer.dim, final_dim)  # fairseq ``project_q``
        self.final_proj = nn.Linear(encoder.dim, final_dim)  # fairseq ``final_proj``
        self.num_negatives, self.temperature = num_negatives, temperature
        self.diversity_weight, self.penalty_weight = diversity_weight, penalty_weight

    def batch_hook(self) -> BatchHook:
        return self.masker

    def set_step(self, step: int) -> None:
        self.quantizer.set_step(step)  # the Gumbel temperature after ``step`` updates

    def forward(self, batch: dict) -> dict[str, Tensor]:
        feats = self.encoder.extract(batch["audio"], batch["audio_lens"])
        b, t, _ = feats.x.shape
        lengths = feats.lengths
        valid = ~lengths_to_padding_mask(lengths, t)  # (B, T)
        pred_mask = prediction_mask(batch, self.masker, lengths, t)

        # the targets: quantized latents of the unmasked features (B, T, final_dim); the code
        # distribution (perplexity, diversity loss) is averaged over masked frames only, as in
        # fairseq, which quantizes ``unmasked_features[mask_indices]``
        quant = self.quantizer(self.feature_dropout(self.quantizer_norm(feats.raw)), weight=pred_mask)
        targets = self.project_q(quant.quantized)
        # the predictions: context vectors of the masked input (B, T, final_dim)
        hidden = self.encoder.contextualize(self.encoder.mask(feats.x, pred_mask), lengths).hidden
        pred = self.final_proj(hidden)

        frames = torch.arange(t, device=pred.device).expand(b, t)
        negatives, usable = sample_negatives(pred_mask, frames, self.num_negatives)
        # a distractor with the positive's very codes is the positive (fairseq ``neg_is_pos``)
        codes = quant.codes  # (B, T, G)
        neg_codes = codes.gather(1, negatives.view(b, -1, 1).expand(-1, -1, codes.shape[-1]))
        same = (neg_codes.view(b, t, -1, codes.shape[-1]) == codes.unsqueeze(2)).all(-1)
        logits = gather_logits(pred, targets, frames, negatives, self.temperature, True, same | ~usable)
        contrastive, accuracy = info_nce(logits, pred_mask)

        diversity = diversity_loss(quant.perplexity, self.quantizer.groups, self.quantizer.entries)
        penalty = feature_penalty(feats.raw, lengths)
        loss = contrastive + self.diversity_weight * diversity + self.penalty_weight * penalty
        masked = pred_mask.sum().float()
        return {
            "loss": loss,
            "contrastive_loss": contrastive.detach(),
            "diversity_loss": diversity.detach(),
            "feature_penalty_loss": penalty.detach(),
            "accuracy": accuracy.detach(),
            "perplexity": quant.perplexity.detach(),
            "code_perplexity": quant.code_perplexity.detach(),
            "temperature": torch.full((), self.quantizer.temperature, device=loss.device),
            "mask_fraction": masked / valid.sum().clamp(min=1).float(),
        }


# wav2vec 2.0, sec. 4.2 / fairseq ``final_dim``: 256 for BASE, 768 for LARGE
FINAL_DIM = {"tiny": 32, "base": 256, "large": 768}
# fairseq ``dropout_features`` on the quantizer's input: wav2vec2_base_librispeech.yaml 0.1,
# wav2vec2_large_librivox.yaml 0.0 (tiny follows base)
DROPOUT_FEATURES = {"tiny": 0.1, "base": 0.1, "large": 0.0}


def final_dim_for(size: str, final_dim: int | None) -> int:
    if final_dim is not None:
        return final_dim
    if size not in FINAL_DIM:
        raise ConfigError(f"no default final_dim for model size {size!r}; set objective.final_dim")
    return FINAL_DIM[size]


def build_encoder(
    family: str, size: str, overrides: dict[str, Any] | None, feature_grad_mult: float | None = None
) -> SpeechEncoder:
    """The registered encoder preset ``<family>_<size>`` with keyword ``overrides``.

    ``feature_grad_mult`` (fairseq's name) sets the encoder's ``feature_grad_scale``, the one
    place the frontend gradient is scaled; None keeps the preset's (0.1 for base and large)."""
    name = f"{family}_{size}"
    if name not in ENCODERS:
        raise ConfigError(f"model.size {size!r}: there is no encoder preset {name!r}")
    overrides = dict(overrides or {})
    if feature_grad_mult is not None:
        overrides["feature_grad_scale"] = feature_grad_mult
    return ENCODERS.build(name, **overrides)


@OBJECTIVES.register
def wav2vec2(
    size: str = "base",
    mask_prob: float = 0.65,  # wav2vec 2.0, sec. 4.2: p = 0.065 of frames start a span ...
    mask_span: int = 10,  # ... of M = 10 frames
    min_masks: int = 2,
    num_negatives: int = 100,  # K = 100 distractors
    temperature: float = 0.1,  # kappa = 0.1
    codebook_groups: int = 2,  # G = 2
    codebook_entries: int = 320,  # V = 320
    max_temp: float = 2.0,  # Gumbel tau annealed from 2 ...
    min_temp: float = 0.5,  # ... to 0.5 ...
    temp_decay: float = 0.999995,  # ... by this factor per update
    diversity_weight: float = 0.1,  # alpha = 0.1
    penalty_weight: float = 10.0,  # fairseq ``loss_weights=[0.1, 10]`` (feature penalty)
    feature_grad_mult: float | None = None,  # None: the preset's (0.1, fairseq BASE recipe)
    dropout_features: float | None = None,  # None: the size's (fairseq BASE 0.1, LARGE 0.0)
    final_dim: int | None = None,
    seed: int = 0,
    encoder: dict[str, Any] | None = None,
) -> Wav2Vec2Objective:
    """wav2vec 2.0 on the ``wav2vec2_<size>`` encoder; ``encoder`` holds preset overrides."""
    enc = build_encoder("wav2vec2", size, encoder, feature_grad_mult)
    dim = final_dim_for(size, final_dim)
    quantizer = GumbelProductQuantizer(
        enc.feature_dim, dim, codebook_groups, codebook_entries, max_temp, min_temp, temp_decay
    )
    masker = SpanMasker(enc.frame_spec, mask_prob, mask_span, min_masks, seed)
    # the quantizer reads the frontend features after the projection's LayerNorm, as fairseq
    norm = enc.projection.norm if hasattr(enc, "projection") else nn.Identity()
    if dropout_features is None:
        dropout_features = DROPOUT_FEATURES.get(size, 0.1)
    return Wav2Vec2Objective(
        enc, quantizer, masker, norm, dim, num_negatives, temperature, diversity_weight, penalty_weight,
        dropout_features,
    )
