"""Every registered objective, at tiny size on a batch made as the loader makes them
(``mmssl.testing.synthetic_batch``): under bf16 autocast, and (on CUDA) without a host sync.

bf16: the precision the trainer uses on CUDA. CI has no GPU, so this runs CPU autocast
(``torch.autocast("cpu", torch.bfloat16)``): it casts matmuls, convolutions and linear layers
to bf16 as CUDA autocast does, which is what breaks
objectives (dtype mismatches in index/scatter ops, losses or logits left in bf16). Each
objective, at tiny size, must return a float32 loss close to its float32 loss on the same batch
and masks, with finite gradients.

The CPU stands in for CUDA here, so the kernels must not depend on which CPU runs the suite:
oneDNN is switched off and ATen's own kernels run. With it on, a CPU with AVX-512 takes
oneDNN's bf16 kernels and an AVX2-only CPU does not (PyTorch then uses ATen's, as here), so
the same test would compute different roundings on different machines. What oneDNN does
with the one recurrent layer kind it would run in bf16 is tested in ``tests/nn/test_context.py``.
"""

from __future__ import annotations

import pytest
import torch

import mmssl.objectives  # noqa: F401  (registers the objectives)
from mmssl.registry import OBJECTIVES
from mmssl.testing import synthetic_batch

NAMES = OBJECTIVES.names()


def _aten_kernels():
    """oneDNN off, its other flags untouched: the same CPU kernels on every x86-64 CPU (above)."""
    return torch.backends.mkldnn.flags(
        enabled=False, deterministic=None, allow_tf32=None, fp32_precision=None
    )


def _loss_and_grads(objective, batch: dict, bf16: bool) -> tuple[torch.Tensor, list]:
    objective.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # dropout and in-step sampling alike in both runs
    with _aten_kernels():
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


# PyTorch ops that synchronise inside their CUDA kernels whatever their inputs; each is allowed to
# sync, forward and backward, so the check still covers everything around it. Seen on an H200,
# 2026-12-04.
SYNCING_OPS = {
    # LossCTC.cu copies the lengths to the device with blocking copies (forward and backward),
    # even when they come as host lists
    "ctc": (torch.nn.functional, "ctc_loss"),
    # cusolver's error code of the eigendecomposition is read back on the host
    "dcca": (torch.linalg, "eigvalsh"),
    "dccae": (torch.linalg, "eigvalsh"),
}


def _set_sync_mode(mode: int | str):
    def hook(grad):
        torch.cuda.set_sync_debug_mode(mode)
        return grad

    return hook


def _allow_sync(fn):
    """``fn`` run with syncs allowed; its backward too: from the gradient of its outputs (a hook
    there lifts the check) to the gradient of its first argument (a hook there restores it)."""

    def call(first, *args, **kwargs):
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("default")
        try:
            out = fn(first, *args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(mode)
        if torch.is_grad_enabled() and first.requires_grad:
            for t in out if isinstance(out, tuple) else (out,):
                if t.requires_grad:
                    t.register_hook(_set_sync_mode("default"))
            first.register_hook(_set_sync_mode(mode))
        return out

    return call


@pytest.mark.cuda
@pytest.mark.parametrize("name", NAMES)
def test_training_step_and_step_hook_have_no_host_sync(name, monkeypatch):
    """A host sync stalls the GPU every step; ``set_sync_debug_mode("error")`` makes any sync
    (``.item()``, boolean-mask indexing, a device tensor read by a CPU op) raise. The one
    PyTorch op of ``SYNCING_OPS`` that syncs by itself is let through."""
    if name in SYNCING_OPS:
        module, attr = SYNCING_OPS[name]
        monkeypatch.setattr(module, attr, _allow_sync(getattr(module, attr)))
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
