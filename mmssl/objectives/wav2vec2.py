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
quantized (no data-dependent shapes) and the average is weighted by ``pred_mask``. An L2
penalty keeps the frontend outputs small (weight 10, fairseq ``feature_pen``).

The step never syncs with the host: negatives are sampled with torch ops on the device, and
the contrastive loss is computed for every frame and weighted by the mask instead of picking
masked frames with a boolean index. Similarities come from one ``(B, T, T)`` matrix per batch
(each prediction against every latent of its utterance) gathered at the sampled indices,
which is far smaller than the ``(B, T, K, D)`` tensor of gathered negatives.

The contrastive pieces (``sample_negatives``, ``gather_logits``, ``info_nce``) live in
``mmssl.nn.contrastive``, shared with CPC / wav2vec; the feature penalty and the default
``final_dim`` in ``mmssl.nn.prediction``, shared with HuBERT and AV-HuBERT.

Shape legend: B batch, S samples, T frames, A anchors, N negatives, C model dim, D code dim.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mmssl.encoders import build_family
from mmssl.encoders.base import SpeechEncoder
from mmssl.errors import ConfigError
from mmssl.nn.contrastive import gather_logits, info_nce, sample_negatives
from mmssl.nn.masking import SpanMasker, prediction_mask
from mmssl.nn.padding import lengths_to_padding_mask
from mmssl.nn.prediction import feature_penalty, final_dim_for
from mmssl.nn.quantizer import GumbelProductQuantizer, diversity_loss
from mmssl.objectives.base import BatchHook, Objective
from mmssl.registry import OBJECTIVES


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
            raise ConfigError(
                f"wav2vec2: objective.dropout_features must be in [0, 1), got {dropout_features}"
            )
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


# fairseq ``dropout_features`` on the quantizer's input: wav2vec2_base_librispeech.yaml 0.1,
# wav2vec2_large_librivox.yaml 0.0 (tiny follows base)
DROPOUT_FEATURES = {"tiny": 0.1, "base": 0.1, "large": 0.0}


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
    enc = build_family("wav2vec2", size, encoder, feature_grad_mult)
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
        enc,
        quantizer,
        masker,
        norm,
        dim,
        num_negatives,
        temperature,
        diversity_weight,
        penalty_weight,
        dropout_features,
    )
