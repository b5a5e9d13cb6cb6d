"""Multi-view contrastive learning between speech and lip video (audio tower vs video tower).

Two symmetric InfoNCE losses (van den Oord et al., 2018; CLIP's symmetric form, Radford et al.,
2021), with one learnable temperature each, log-parameterised and clamped as CLIP (scale at
most 100, initial temperature 0.07; ``LogitScale``, clamped in place by ``on_step``):

* utterance level: padding-aware mean over valid frames, a linear head, L2 normalisation; the
  positive of an utterance is its own other view, the negatives every other utterance of the
  global batch (``mmssl.nn.contrastive.symmetric_info_nce`` without groups: embeddings gathered
  from every rank; each rank scores its own rows against all columns, and the labels are offset
  by the number of rows of the lower ranks, since the bucketed sampler gives every rank its own
  ``B``);
* frame level: the positive of an audio frame is the video frame at the same time of the same
  utterance; the negatives are all other valid frames of the local batch (other times and other
  utterances). Padded frames are neither anchors nor negatives (their logits are masked).
  Frames are not gathered across ranks: padded lengths differ from rank to rank, and the
  local batch already gives thousands of negatives per anchor.

Shape legend: B batch, T frames (25 Hz), C channels, D embedding dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmssl.encoders.av import TwoTowerViews, require_paired, two_views
from mmssl.errors import ConfigError
from mmssl.nn.contrastive import Gather, LogitScale, gather_rows, symmetric_info_nce
from mmssl.nn.padding import lengths_to_padding_mask, masked_mean
from mmssl.objectives.base import Objective
from mmssl.registry import OBJECTIVES


def frame_info_nce(za: Tensor, zv: Tensor, lengths: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """Frame-level symmetric InfoNCE of normalised ``za (B, T, D)`` / ``zv (B, T, D)``.

    Every valid frame is an anchor; its positive is the other view's frame at the same
    ``(b, t)``; all other valid frames of the batch are negatives. Returns ``(loss, accuracy)``
    averaged over valid frames.
    """
    b, t, d = za.shape
    keep = (~lengths_to_padding_mask(lengths, t)).reshape(-1)  # (B*T,)
    fa, fv = za.reshape(b * t, d), zv.reshape(b * t, d)
    labels = torch.arange(b * t, device=za.device)
    column_pad = (~keep).unsqueeze(0)  # padded frames are never negatives
    weights = keep.to(za.dtype)
    count = weights.sum().clamp(min=1)
    losses = []
    for rows, cols in ((fa, fv), (fv, fa)):
        logits = (scale * rows @ cols.T).float().masked_fill(column_pad, float("-inf"))  # (B*T, B*T)
        # padded anchor rows would be all -inf but for their own label: give them a finite row
        logits = logits.masked_fill((~keep).unsqueeze(1), 0.0)
        ce = F.cross_entropy(logits, labels, reduction="none")
        losses.append((ce * weights).sum() / count)
    logits_av = (scale * fa @ fv.T).masked_fill(column_pad, float("-inf"))
    acc = (((logits_av.argmax(-1) == labels).to(za.dtype) * weights).sum() / count).detach()
    return 0.5 * (losses[0] + losses[1]), acc


class MultiviewContrastive(Objective):
    """Utterance- and frame-level audio/video InfoNCE on two towers.

    ``views`` holds both towers and the frame-level heads; ``audio_utt`` / ``video_utt`` project
    the pooled tower outputs. A level whose weight is 0 is skipped (its head then takes no
    gradient: run DDP with ``find_unused_parameters``).
    """

    modalities = ("audio", "video")

    def __init__(
        self,
        views: TwoTowerViews,
        utterance_dim: int,
        utterance_weight: float = 1.0,
        frame_weight: float = 1.0,
        rank: int = 0,
        world_size: int = 1,
        gather: Gather = gather_rows,
    ) -> None:
        super().__init__()
        if utterance_weight < 0 or frame_weight < 0 or utterance_weight + frame_weight == 0:
            raise ConfigError("multiview_contrastive: weights must be >= 0 and not both 0")
        self.views = views
        self.audio_utt = nn.Linear(views.audio_tower.dim, utterance_dim)
        self.video_utt = nn.Linear(views.video_tower.dim, utterance_dim)
        self.utterance_scale, self.frame_scale = LogitScale(), LogitScale()
        self.utterance_weight, self.frame_weight = utterance_weight, frame_weight
        self.rank, self.world_size, self.gather = rank, world_size, gather

    def forward(self, batch: dict) -> dict[str, Tensor]:
        require_paired(batch, "multiview_contrastive")
        ha, hv, lengths, _ = self.views.encode_pair(batch)
        out: dict[str, Tensor] = {}
        loss = ha.new_zeros(())
        if self.utterance_weight > 0:
            ua = F.normalize(self.audio_utt(masked_mean(ha, lengths)), dim=-1)
            uv = F.normalize(self.video_utt(masked_mean(hv, lengths)), dim=-1)
            utt, acc, _ = symmetric_info_nce(
                ua, uv, self.utterance_scale(), None, self.rank, self.world_size, self.gather
            )
            loss = loss + self.utterance_weight * utt
            out.update(utterance_loss=utt, utterance_accuracy=acc)
        if self.frame_weight > 0:
            fa = F.normalize(self.views.audio_head(ha), dim=-1)
            fv = F.normalize(self.views.video_head(hv), dim=-1)
            frame, acc = frame_info_nce(fa, fv, lengths, self.frame_scale())
            loss = loss + self.frame_weight * frame
            out.update(frame_loss=frame, frame_accuracy=acc)
        out["loss"] = loss
        out["utterance_temperature"] = 1.0 / self.utterance_scale().detach()
        out["frame_temperature"] = 1.0 / self.frame_scale().detach()
        return out

    def on_step(self, step: int) -> None:
        # CLIP's cap on the logit scale, applied to the parameters after each optimizer step
        self.utterance_scale.clamp_()
        self.frame_scale.clamp_()


@OBJECTIVES.register(shares_encoder=True)
def multiview_contrastive(
    size: str = "base",
    dim: int = 256,
    utterance_weight: float = 1.0,
    frame_weight: float = 1.0,
    rank: int = 0,
    world_size: int = 1,
    shared_encoder: nn.Module | None = None,
) -> MultiviewContrastive:
    """Audio and video towers of ``size``, ``dim``-d embeddings at both levels; given
    ``shared_encoder`` (objective ``multi``), that one audio-visual encoder as both towers."""
    views = two_views(size, dim, shared_encoder)
    return MultiviewContrastive(views, dim, utterance_weight, frame_weight, rank, world_size)
