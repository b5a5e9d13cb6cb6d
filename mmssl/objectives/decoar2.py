"""DeCoAR 2.0 (Ling and Liu, 2020, "DeCoAR 2.0: deep contextualized acoustic representations
with vector quantization"): masked slice reconstruction through a Gumbel product quantizer.

The paper's abstract names three changes to DeCoAR (``mmssl.objectives.decoar``): a
transformer encoder instead of LSTMs, a vector-quantisation layer between the encoder and
the reconstruction module, and a loss that adds the quantizer's diversity loss to the
reconstruction loss. Here:

* **Encoder** (``mmssl.encoders.decoar2``): the released model's shape (12 x 768 post-LN
  wav2vec 2.0 transformer on every second frame of per-utterance normalised 80-d log mels,
  50 Hz; ``base``). The features it reads, ``x (B, T, F)``, are the reconstruction targets.
* **Masking**: spans of input log-mel frames are replaced by the encoder's learned
  ``mask_embedding``, itself a log-mel frame, before the projection (``mask_input``; spans
  from ``SpanMasker``, in the data workers), as the first author's fairseq code masks
  (lingss0918/fairseq ``examples/decoar/models/decoar2.py``: ``apply_mask`` on the 80-d
  source, then ``post_extract_proj``), with that code's default settings, wav2vec 2.0's
  (``mask_prob=0.65`` over spans of 10 frames, at least 2 spans; here the same masked count
  for every utterance of a batch).
* **Quantizer**: a Gumbel product quantizer (``mmssl.nn.quantizer``; G = 2 codebooks of
  V = 320 entries, temperature annealed from 2 to 0.5 by 0.999995 per update, as wav2vec 2.0)
  on the transformer's output ``c_t``, giving ``q_t`` of ``code_dim`` values (the model dim
  unless set).
* **Reconstruction**: as DeCoAR's, one linear head per offset ``i = 0..K`` (one layer
  ``D -> (K + 1) F``) maps ``q_t`` to ``x_{t+i}``, ``K = 20``; the L1 loss covers the slices
  of the *masked* frames only: summed over a slice's frames and mel bins, averaged over the
  masked frames, as that code's criterion does (``F.l1_loss(..., reduction="sum")`` over
  frames and bins, divided by the number of predicted frames).
* **Loss**: ``l1 + alpha * diversity``, the diversity loss of wav2vec 2.0 (eq. 4:
  ``(G V - perplexity) / (G V)``) on the batch's softmax code distribution over the masked
  frames, with ``alpha = 0.1``; the criterion adds it per predicted frame (``coef * penalty *
  sample_size`` to the summed L1), so beside a summed L1 it is a small term.

Checked sources: the paper's abstract (the three changes above), its settings as summarised by
third-party notes (K = 20, G = 2, V = 320), the released model (awslabs/speech-representations,
s3prl ``upstream/decoar2``: the encoder and its input) and the first author's fairseq code
(masking and the loss's reduction; its later variant replaces the Gumbel softmax by a softmax
over a codebook trained beforehand and reconstructs the masked frame alone, which is not
followed here). Chosen here where those are silent, each to be revisited against the paper's
method section:

* the mask probability and span, the quantizer's temperature schedule and ``alpha`` take
  wav2vec 2.0's values, whose modules the released encoder keeps;
* a slice offset past the utterance's end is left out, not the whole slice (DeCoAR drops
  incomplete slices; here that would drop the masked frames near the end);
* a masked frame's slice may run past its span onto frames the encoder sees, as DeCoAR's
  slices hold frames its states have read: the target stays DeCoAR's slice;
* the code distribution of the diversity loss is averaged over the masked frames only (the
  codes the loss reads), as this package's wav2vec 2.0 does after fairseq.

The reconstruction and the quantizer serve pretraining only: features for downstream use
(``mmssl extract``, ``kmeans --checkpoint``, ``layers``, ``finetune-asr --init``) are the
encoder's transformer layers, which read no mask outside training.

The step never syncs with the host: the mask comes from the batch hook (or is drawn on the
device when the batch has none), and every loss is weighted, not indexed.

Shape legend: B batch, S samples, T frames (50 Hz), F mel bins, C model dim, D code dim,
K + 1 frames per slice, G codebooks, V entries per codebook.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from mmssl.encoders.audio import AudioEncoder, build_preset
from mmssl.encoders.decoar2 import build_decoar2_encoder
from mmssl.errors import ConfigError
from mmssl.nn.masking import SpanMasker, prediction_mask
from mmssl.nn.padding import lengths_to_padding_mask
from mmssl.nn.quantizer import GumbelProductQuantizer, QuantizerOutput, diversity_loss
from mmssl.nn.reconstruction import future_slices, masked_l1
from mmssl.objectives.base import BatchHook, Objective, check_settings, size_preset
from mmssl.registry import OBJECTIVES


def slice_l1(pred: Tensor, frames: Tensor, lengths: Tensor, pred_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Masked slice reconstruction: ``pred (B, T, K + 1, F)`` (the slice predicted at each
    frame), ``frames (B, T, F)``, ``lengths (B,)``, ``pred_mask (B, T)`` -> (the sum of
    ``|pred[b, t, i] - frames[b, t + i]|`` over offsets ``i`` with ``t + i < lengths[b]`` and
    bins, averaged over the masked frames ``t``, 0 when nothing is masked;
    ``weight (B, T, K + 1)`` bool, the (frame, offset) pairs read)."""
    b, t, k, f = pred.shape
    targets, inside = future_slices(frames, lengths, k)  # (B, T, K + 1, F), (B, T, K + 1)
    weight = inside & pred_mask.unsqueeze(-1)
    # masked_l1 averages over the (frame, offset) pairs and the bins: times pairs x F, the sum
    mean = masked_l1(pred.reshape(b, t * k, f), targets.reshape(b, t * k, f), weight.reshape(b, t * k))
    return mean * weight.sum() * f / pred_mask.sum().clamp(min=1), weight


class DeCoAR2Objective(Objective):
    """``forward(batch)`` reads ``audio (B, S)``, ``audio_lens (B,)`` and, when the batch hook
    ran, ``pred_mask (B, T)``. Parts: ``encoder`` (an ``AudioEncoder`` on log mels),
    ``quantizer`` on its output, ``heads`` (``D -> (K + 1) F``), ``masker`` (its settings are
    used in forward when the batch has no mask)."""

    modalities = ("audio",)

    def __init__(
        self,
        encoder: AudioEncoder,
        quantizer: GumbelProductQuantizer,
        masker: SpanMasker,
        slice_size: int = 20,
        diversity_weight: float = 0.1,
    ) -> None:
        super().__init__()
        if slice_size < 0:
            raise ConfigError(f"decoar2: objective.slice_size must be >= 0, got {slice_size}")
        if diversity_weight < 0:
            raise ConfigError(f"decoar2: objective.diversity_weight must be >= 0, got {diversity_weight}")
        self.encoder, self.quantizer, self.masker = encoder, quantizer, masker
        self.slice_size, self.diversity_weight = slice_size, diversity_weight
        self.heads = nn.Linear(quantizer.dim, (slice_size + 1) * encoder.feature_dim)

    def batch_hook(self) -> BatchHook:
        return self.masker

    def set_step(self, step: int) -> None:
        self.quantizer.set_step(step)  # the Gumbel temperature after ``step`` updates

    def predict(self, x: Tensor, lengths: Tensor, pred_mask: Tensor) -> tuple[Tensor, QuantizerOutput]:
        """``x (B, T, C)`` projected features -> the slices predicted at every frame
        ``(B, T, K + 1, F)`` from the quantized context of the masked input, and the quantizer's
        output (its code distribution averaged over the masked frames)."""
        b, t, _ = x.shape
        hidden = self.encoder.contextualize(self.encoder.mask(x, pred_mask), lengths).hidden
        quant = self.quantizer(hidden, weight=pred_mask)
        pred = self.heads(quant.quantized).view(b, t, self.slice_size + 1, self.encoder.feature_dim)
        return pred, quant

    def forward(self, batch: dict) -> dict[str, Tensor]:
        feats = self.encoder.extract(batch["audio"], batch["audio_lens"])
        b, t, _ = feats.x.shape
        lengths = feats.lengths
        pred_mask = prediction_mask(batch, self.masker, lengths, t)
        pred, quant = self.predict(feats.x, lengths, pred_mask)
        l1, weight = slice_l1(pred, feats.raw, lengths, pred_mask)
        diversity = diversity_loss(quant.perplexity, self.quantizer.groups, self.quantizer.entries)
        loss = l1 + self.diversity_weight * diversity
        valid = ~lengths_to_padding_mask(lengths, t)
        return {
            "loss": loss,
            "l1_loss": l1.detach(),
            "diversity_loss": diversity.detach(),
            "perplexity": quant.perplexity.detach(),
            "code_perplexity": quant.code_perplexity.detach(),
            "temperature": loss.new_full((), self.quantizer.temperature),
            "mask_fraction": pred_mask.sum().float() / valid.sum().clamp(min=1).float(),
            # the frames the L1 averages over, and the (masked frame, offset) pairs it sums
            "masked_frames": pred_mask.sum().float(),
            "slice_frames": weight.sum().float(),
        }


# base: the released model (``mmssl.encoders.decoar2``); large: wav2vec 2.0 LARGE's transformer
# (not in the paper); tiny for tests and the built-in corpus
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(dim=64, num_layers=2, num_heads=4, ffn_dim=128, pos_conv_kernel=16, pos_conv_groups=4),
    "base": dict(dim=768, num_layers=12, num_heads=12, ffn_dim=3072),
    "large": dict(
        dim=1024, num_layers=24, num_heads=16, ffn_dim=4096, pre_norm=True, dropout=0.0, attention_dropout=0.0
    ),
}


@OBJECTIVES.register
def decoar2(
    size: str = "base",
    frame_skip: int = 2,  # the released model reads every second 10 ms frame (50 Hz)
    slice_size: int = 20,  # K: slices of K + 1 frames (the paper's K = 20; 420 ms at 50 Hz)
    mask_prob: float = 0.65,  # wav2vec 2.0, sec. 4.2: p = 0.065 of frames start a span ...
    mask_span: int = 10,  # ... of M = 10 frames
    min_masks: int = 2,
    codebook_groups: int = 2,  # G = 2 (wav2vec 2.0)
    codebook_entries: int = 320,  # V = 320
    code_dim: int | None = None,  # D; None: the model dim
    max_temp: float = 2.0,  # Gumbel tau annealed from 2 ...
    min_temp: float = 0.5,  # ... to 0.5 ...
    temp_decay: float = 0.999995,  # ... by this factor per update
    diversity_weight: float = 0.1,  # alpha (wav2vec 2.0's)
    seed: int = 0,
    encoder: dict[str, Any] | None = None,
) -> DeCoAR2Objective:
    """DeCoAR 2.0 on the ``size`` preset (``tiny``, ``base``: the released model, ``large``);
    ``encoder`` holds overrides of ``build_decoar2_encoder``'s arguments (``num_mel_bins``,
    ``input_dropout``, transformer fields such as ``dim`` or ``layer_drop``)."""
    preset = size_preset("decoar2", size, SIZES)
    check_settings(
        "decoar2",
        {
            "frame_skip": frame_skip,
            "slice_size": slice_size,
            "codebook_groups": codebook_groups,
            "codebook_entries": codebook_entries,
        },
        minimum={"frame_skip": 1, "slice_size": 0, "codebook_groups": 1, "codebook_entries": 2},
    )
    enc = build_preset(build_decoar2_encoder, "decoar2", {**preset, "frame_skip": frame_skip}, encoder or {})
    dim = enc.dim if code_dim is None else code_dim
    if dim < codebook_groups or dim % codebook_groups:
        raise ConfigError(
            f"decoar2: objective.code_dim {dim} must be a positive multiple of "
            f"objective.codebook_groups={codebook_groups}"
        )
    quantizer = GumbelProductQuantizer(
        enc.dim, dim, codebook_groups, codebook_entries, max_temp, min_temp, temp_decay
    )
    masker = SpanMasker(enc.frame_spec, mask_prob, mask_span, min_masks, seed)
    return DeCoAR2Objective(enc, quantizer, masker, slice_size, diversity_weight)
