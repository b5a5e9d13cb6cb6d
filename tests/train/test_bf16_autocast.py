"""Every registered objective under bf16 autocast, the precision the trainer uses on CUDA.

CI has no GPU, so this runs CPU autocast (``torch.autocast("cpu", torch.bfloat16)``): it casts
matmuls, convolutions and linear layers to bf16 as CUDA autocast does, which is what breaks
objectives (dtype mismatches in index/scatter ops, losses or logits left in bf16). Each
objective, at tiny size, must return a float32 loss close to its float32 loss on the same batch
and masks, with finite gradients.
"""

from __future__ import annotations

import pytest
import torch

import mmssl.objectives  # noqa: F401  (registers the objectives)
from mmssl.registry import OBJECTIVES
from mmssl.testing import synthetic_batch

NAMES = OBJECTIVES.names()


def _loss_and_grads(objective, batch: dict, bf16: bool) -> tuple[torch.Tensor, list]:
    objective.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # dropout and in-step sampling alike in both runs
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = objective(batch)["loss"]
    loss.backward()
    return loss.detach(), [p.grad for p in objective.parameters() if p.grad is not None]


@pytest.mark.parametrize("name", NAMES)
def test_objective_trains_under_bf16_autocast(name):
    torch.manual_seed(0)
    objective = OBJECTIVES.build(name, size="tiny").train()
    batch = synthetic_batch(objective)
    loss32, _ = _loss_and_grads(objective, batch, bf16=False)
    loss16, grads = _loss_and_grads(objective, batch, bf16=True)
    assert loss16.dtype == torch.float32, f"{name}: the loss is {loss16.dtype} under autocast"
    assert torch.isfinite(loss16)
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert loss16 == pytest.approx(float(loss32), rel=0.05, abs=0.05)
