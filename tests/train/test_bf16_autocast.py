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
from mmssl.testing import tiny_av_batch

NAMES = OBJECTIVES.names()


def _batch_for(objective) -> dict:
    """One 3-utterance batch with every key the objective reads: audio (+ video), 100 Hz
    targets for objectives with classes, transcripts and caption groups, images through the
    objective's own transform."""
    batch = tiny_av_batch(seconds=(0.96, 0.72, 0.48))
    modalities = set(getattr(objective, "modalities", ("audio",)))
    if "video" not in modalities:
        batch.pop("video"), batch.pop("video_lens")
    if "audio" not in modalities:
        batch.pop("audio"), batch.pop("audio_lens")
    g = torch.Generator().manual_seed(0)
    classes = getattr(objective, "num_classes", None)
    if classes:
        frames = int(batch.get("audio_lens", torch.tensor([0])).max()) // 160 or 4 * int(batch["video_lens"].max())
        batch["targets"] = torch.randint(int(classes), (3, frames), generator=g)
    batch["transcript"] = ["one red circle", "a big blue square", "two stars"]
    batch["group"] = ["img0", "img1", "img2"]
    if "image" in modalities:
        images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8, generator=g)
        transform = getattr(objective, "image_transform", None)
        batch["image"] = torch.stack([transform(im) if transform else im.float() / 255 for im in images])
    hook = objective.batch_hook()
    return hook(batch) if hook is not None else batch


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
    batch = _batch_for(objective)
    loss32, _ = _loss_and_grads(objective, batch, bf16=False)
    loss16, grads = _loss_and_grads(objective, batch, bf16=True)
    assert loss16.dtype == torch.float32, f"{name}: the loss is {loss16.dtype} under autocast"
    assert torch.isfinite(loss16)
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert loss16 == pytest.approx(float(loss32), rel=0.05, abs=0.05)
