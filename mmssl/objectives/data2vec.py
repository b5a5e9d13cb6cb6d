"""data2vec for speech (Baevski et al., 2022): regress a teacher's layer average at masked frames.

The student sees masked features (mask_prob 0.65, span 10, as wav2vec 2.0); the teacher, an
exponential moving average of the student's transformer, sees the same features unmasked and
before the encoder's input dropout (fairseq ``pre_encoder_features``, ``Features.clean``), so
its targets do not change from one pass over a batch to the next. The
target of each frame is the average of the teacher's top K = 8 blocks' feed-forward outputs,
each instance-normalised over time (per utterance and channel, valid frames only), and the
student regresses it at masked frames through a linear head (sec. 3.3-3.4).

Targets: as data2vec audio (fairseq ``layer_results``' ``layer_result``, with
``instance_norm_target_layer=True``), each block's output is taken from its feed-forward
network before the last residual connection (and before the post-LN norm), not from the
residual stream: the teacher runs with ``keep_ffn=True`` and reads ``EncoderOutput.ffn``.
Unlike fairseq's ``F.instance_norm``, the statistics leave padding out.

EMA: decay annealed linearly from 0.999 to 0.9999 over ``ema_anneal_steps`` updates, then held
(sec. 4.1 audio: tau_0 = 0.999, tau_e = 0.9999, n_tau = 30k). As data2vec's
``ema_transformer_only``, the teacher is a copy of the student's *transformer* alone (the
encoder's ``transformer``, what ``contextualize`` runs) and reads the student's unmasked
projected features: the frontend, projection and mask embedding have no teacher copy and no
EMA. As ``ema_layers_only`` (both true in fairseq's audio base_librispeech.yaml), the
position convolution is not averaged but copied from the student after every update (fairseq
passes its ``pos_conv`` parameters as the EMA's ``skip_keys``); everything else in the
transformer (its blocks and its LayerNorm) is averaged. The teacher has ``requires_grad`` off,
so it is checkpointed and moved with the model but never optimised, and always runs in eval
mode (no dropout).

Loss: squared error summed over the channels and scaled by 1 / sqrt(D) (``loss_beta=0``), or a
smooth L1 with ``beta``; averaged over masked frames.

Shape legend: B batch, S samples, T frames, C model dim.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmssl.encoders import build_family
from mmssl.encoders.base import SpeechEncoder
from mmssl.errors import ConfigError
from mmssl.nn.masking import SpanMasker, prediction_mask
from mmssl.nn.padding import instance_norm
from mmssl.nn.transformer import TransformerEncoder
from mmssl.objectives.base import BatchHook, Objective
from mmssl.registry import OBJECTIVES

# teacher parameters copied from the student instead of averaged (data2vec ``ema_layers_only``)
COPIED_PREFIX = "pos_conv."


def layer_average_targets(layers: list[Tensor], lengths: Tensor, top_k: int) -> Tensor:
    """Average of the instance-normalised top ``top_k`` of ``layers`` (each ``(B, T, C)``; the
    teacher's feed-forward outputs); an encoder with fewer layers (the tiny presets) averages
    all of them."""
    if top_k < 1:
        raise ConfigError(f"data2vec: top_k must be >= 1, got {top_k}")
    picked = [instance_norm(layer.float(), lengths) for layer in layers[-top_k:]]
    return torch.stack(picked).mean(0)


def regression_loss(pred: Tensor, target: Tensor, weight: Tensor, beta: float = 0.0) -> Tensor:
    """Mean over frames with ``weight (B, T)`` of the per-frame error between ``pred`` and
    ``target`` (B, T, C): squared error summed over C times 1/sqrt(C) when ``beta == 0``
    (data2vec), else smooth L1 with ``beta`` summed over C times 1/sqrt(C)."""
    pred, target = pred.float(), target.float()
    if beta == 0:
        err = (pred - target).pow(2)
    else:
        err = F.smooth_l1_loss(pred, target, reduction="none", beta=beta)
    per_frame = err.sum(-1) / math.sqrt(pred.shape[-1])  # (B, T)
    w = weight.to(per_frame.dtype)
    return (per_frame * w).sum() / w.sum().clamp(min=1.0)


def ema_decay_at(step: int, start: float, end: float, anneal_steps: int) -> float:
    """Linear from ``start`` at step 0 to ``end`` at ``anneal_steps``, then ``end``."""
    if anneal_steps <= 0 or step >= anneal_steps:
        return end
    return start + (end - start) * step / anneal_steps


class Data2VecObjective(Objective):
    """``forward(batch)`` reads ``audio (B, S)``, ``audio_lens (B,)`` and ``pred_mask (B, T)``
    from the batch hook. Parts: ``encoder`` (the student; the teacher is copied from it),
    ``masker``."""

    def __init__(
        self,
        encoder: SpeechEncoder,
        masker: SpanMasker,
        top_k: int = 8,
        ema_start: float = 0.999,
        ema_end: float = 0.9999,
        ema_anneal_steps: int = 30_000,
        loss_beta: float = 0.0,
    ) -> None:
        super().__init__()
        self.encoder, self.masker = encoder, masker
        student = getattr(encoder, "transformer", None)
        if not isinstance(student, TransformerEncoder):
            raise ConfigError(
                f"data2vec: the encoder {type(encoder).__name__} has no transformer to copy as teacher"
            )
        # data2vec ``ema_transformer_only``: the teacher is the transformer alone
        self.teacher = copy.deepcopy(student).requires_grad_(False).eval()
        self.head = nn.Linear(encoder.dim, encoder.dim)  # data2vec ``final_proj``
        self.top_k, self.loss_beta = top_k, loss_beta
        self.ema_start, self.ema_end, self.ema_anneal_steps = ema_start, ema_end, ema_anneal_steps
        self.ema_decay = ema_start

    def batch_hook(self) -> BatchHook:
        return self.masker

    def set_step(self, step: int) -> None:
        """The EMA decay of update ``step`` (the last update's; logged as ``ema_decay``)."""
        self.ema_decay = ema_decay_at(step, self.ema_start, self.ema_end, self.ema_anneal_steps)

    def train(self, mode: bool = True) -> Data2VecObjective:
        super().train(mode)
        self.teacher.eval()
        return self

    @torch.no_grad()
    def on_step(self, step: int) -> None:
        """After update ``step`` (the trainer passes 1 after the first): move the teacher's
        parameters towards the student transformer's with the decay of ``step``, except the
        position convolution's, which are copied (``ema_layers_only``). Buffers are copied."""
        self.set_step(step)
        student = dict(self.encoder.transformer.named_parameters())
        averaged: tuple[list[Tensor], list[Tensor]] = ([], [])
        copied: tuple[list[Tensor], list[Tensor]] = ([], [])
        for name, param in self.teacher.named_parameters():
            pair = copied if name.startswith(COPIED_PREFIX) else averaged
            pair[0].append(param)
            pair[1].append(student[name].detach())
        torch._foreach_lerp_(averaged[0], averaged[1], 1.0 - self.ema_decay)
        if copied[0]:
            torch._foreach_copy_(copied[0], copied[1])
        for t_buf, s_buf in zip(self.teacher.buffers(), self.encoder.transformer.buffers()):
            t_buf.copy_(s_buf)

    @torch.no_grad()
    def targets(self, x: Tensor, lengths: Tensor) -> Tensor:
        """The teacher's targets ``(B, T, C)`` for the unmasked projected features ``x (B, T, C)``
        (``Features.clean``, before input dropout): the instance-normalised mean of its top
        ``top_k`` feed-forward outputs."""
        out = self.teacher(x.detach(), lengths, frame_rate=self.encoder.frame_rate, keep_ffn=True)
        return layer_average_targets(out.ffn, lengths, self.top_k)

    def forward(self, batch: dict) -> dict[str, Tensor]:
        feats = self.encoder.extract(batch["audio"], batch["audio_lens"])
        t = feats.x.shape[1]
        lengths = feats.lengths
        pred_mask = prediction_mask(batch, self.masker, lengths, t)
        targets = self.targets(feats.clean, lengths)  # (B, T, C), from the features before input dropout
        hidden = self.encoder.contextualize(self.encoder.mask(feats.x, pred_mask), lengths).hidden
        pred = self.head(hidden)
        loss = regression_loss(pred, targets, pred_mask, self.loss_beta)
        w = pred_mask.unsqueeze(-1).float()
        count = w.sum().clamp(min=1.0)
        # spread of targets and predictions over masked frames: a collapse shows as variance -> 0
        target_var = (targets.pow(2) * w).sum() / (count * targets.shape[-1])
        p = pred.detach().float()
        p_mean = (p * w).sum(0, keepdim=True).sum(1, keepdim=True) / count
        pred_var = ((p - p_mean).pow(2) * w).sum() / (count * p.shape[-1])
        return {
            "loss": loss,
            "regression_loss": loss.detach(),
            "target_var": target_var,
            "pred_var": pred_var,
            "ema_decay": torch.full((), self.ema_decay, device=loss.device),
            "mask_fraction": pred_mask.sum().float() / lengths.sum().clamp(min=1).float(),
        }


@OBJECTIVES.register
def data2vec(
    size: str = "base",
    mask_prob: float = 0.65,  # data2vec audio, sec. 4.1: p = 0.065 span starts ...
    mask_span: int = 10,  # ... of 10 frames
    min_masks: int = 2,
    top_k: int = 8,  # K = 8 top layers averaged
    ema_start: float = 0.999,  # tau_0
    ema_end: float = 0.9999,  # tau_e
    ema_anneal_steps: int = 30_000,  # n_tau
    loss_beta: float = 0.0,  # 0: squared error (data2vec audio); > 0: smooth L1 with this beta
    seed: int = 0,
    encoder: dict[str, Any] | None = None,
) -> Data2VecObjective:
    """data2vec on the ``data2vec_<size>`` encoder; ``encoder`` holds preset overrides."""
    enc = build_family("data2vec", size, encoder)
    masker = SpanMasker(enc.frame_spec, mask_prob, mask_span, min_masks, seed)
    return Data2VecObjective(enc, masker, top_k, ema_start, ema_end, ema_anneal_steps, loss_beta)
