"""AdamW with the usual parameter groups, and learning-rate schedules.

Schedules are plain objects holding only ``step``; ``lr_at(step)`` is a pure function of the
step, so resuming only needs the step back (``state_dict``/``load_state_dict``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from mmssl.errors import ConfigError

_NO_DECAY_TYPES = (
    nn.Embedding,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.InstanceNorm1d,
    nn.RMSNorm,
)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups over the parameters that train.

    Parameters with ``requires_grad=False`` (EMA teachers, frozen towers) are left out.
    Biases, norm scales, embeddings and other vectors get no weight decay (as BERT, and
    wav2vec 2.0 / HuBERT in fairseq, which decay only matrices and kernels).
    """
    no_decay_ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, _NO_DECAY_TYPES):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if p.ndim <= 1 or id(p) in no_decay_ids else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_adamw(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.01,
    betas: tuple[float, float] = (0.9, 0.98),
    eps: float = 1e-6,
) -> torch.optim.AdamW:
    """Fused AdamW over ``param_groups`` (fused kernels run on CUDA and on the CPU).

    The fused kernel reads ``optimizer.found_inf``: the loop sets it to 1 to skip a step
    whose gradients are not finite, without a host sync. ``betas=(0.9, 0.98)`` and
    ``eps=1e-6`` are wav2vec 2.0's (sec. 4.2) and HuBERT's pretraining values.
    """
    groups = param_groups(model, weight_decay)
    if not groups:
        raise ConfigError("the objective has no trainable parameters")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)


@dataclass
class Schedule:
    """Learning-rate multiplier over steps, times ``peak_lr``.

    ``kind``:
      * ``constant``: linear warm-up, then flat.
      * ``linear``: linear warm-up to the peak, then linear decay to ``final_scale * peak``
        at ``total_steps`` (wav2vec 2.0 / HuBERT "polynomial_decay" with power 1).
      * ``cosine``: linear warm-up, then half a cosine down to ``final_scale * peak``.
      * ``tri_stage``: warm-up, hold at the peak, exponential decay to ``final_scale * peak``
        (fairseq ``tri_stage``; wav2vec 2.0 fine-tuning uses 10% / 40% / 50%). Warm-up starts at
        ``init_scale * peak``.
    ``warmup_steps`` and ``hold_steps`` are steps; decay fills the rest of ``total_steps``.
    """

    peak_lr: float
    total_steps: int
    kind: str = "linear"
    warmup_steps: int = 0
    hold_steps: int = 0
    final_scale: float = 0.0
    init_scale: float = 0.0
    step: int = 0

    KINDS = ("constant", "linear", "cosine", "tri_stage")

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise ConfigError(
                f"train.schedule: unknown schedule {self.kind!r}; known: {', '.join(self.KINDS)}"
            )
        if self.warmup_steps < 0 or self.hold_steps < 0 or self.total_steps <= 0:
            raise ConfigError("train.warmup_steps/hold_steps must be >= 0 and train.max_steps > 0")

    def scale_at(self, step: int) -> float:
        """Multiplier of ``peak_lr`` for the update made at ``step`` (0-based)."""
        warm = self.warmup_steps
        init = self.init_scale if self.kind == "tri_stage" else 0.0
        if step < warm:
            return init + (1.0 - init) * (step + 1) / warm
        if self.kind == "constant":
            return 1.0
        if self.kind == "tri_stage" and step < warm + self.hold_steps:
            return 1.0
        start = warm + (self.hold_steps if self.kind == "tri_stage" else 0)
        span = max(1, self.total_steps - start)
        frac = min(1.0, (step - start) / span)
        final = self.final_scale
        if self.kind == "linear":
            return 1.0 + (final - 1.0) * frac
        if self.kind == "cosine":
            return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * frac))
        # tri_stage: exponential from 1 to final (fairseq uses log(final_lr_scale) / decay_steps)
        return math.exp(math.log(max(final, 1e-12)) * frac)

    def lr_at(self, step: int) -> float:
        return self.peak_lr * self.scale_at(step)

    def apply(self, optimizer: torch.optim.Optimizer) -> float:
        """Write the learning rate for the current step into every group; return it."""
        lr = self.lr_at(self.step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def advance(self) -> None:
        self.step += 1

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
