"""Every registered objective, at tiny size on a batch made as the loader makes them
(``mmssl.testing.synthetic_batch``): under bf16 autocast, and (on CUDA) without a host sync.

bf16: the precision the trainer uses on CUDA. CI has no GPU, so this runs CPU autocast (``torch.autocast("cpu", torch.bfloat16)``): it casts
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


@pytest.mark.cuda
@pytest.mark.parametrize("name", NAMES)
def test_training_step_and_step_hook_have_no_host_sync(name):
    """A host sync stalls the GPU every step; ``set_sync_debug_mode("error")`` makes any sync
    (``.item()``, boolean-mask indexing, a device tensor read by a CPU op) raise."""
    torch.manual_seed(0)
    objective = OBJECTIVES.build(name, size="tiny").cuda().train()
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in synthetic_batch(objective).items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        objective(batch)["loss"].backward()  # warm-up: lazy CUDA initialisation may sync
    objective.set_step(0)
    objective.on_step(1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        objective.set_step(1)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            objective(batch)["loss"].backward()
        objective.on_step(2)
    finally:
        torch.cuda.set_sync_debug_mode("default")
