"""The interface between objectives and the trainer.

An objective is an ``nn.Module`` built from injected encoders. ``forward(batch)`` returns
``dict[str, Tensor]``: ``loss`` (scalar, what is minimised), named ``*_loss`` parts and
metrics (accuracy, perplexity, code usage...), all tensors, so the step never syncs with the
host. It never reads globals: objectives that gather across ranks take ``rank`` and
``world_size`` as builder arguments.

Two optional hooks, both called by the trainer:

* ``batch_hook()`` returns a small picklable callable ``(batch) -> batch`` that the data
  workers run after collation, to add CPU tensors such as ``pred_mask`` (so masks are made
  off the training step). ``forward`` must also work without it (it then makes the same
  tensors itself), so tests and evaluation can pass a plain collated batch. A hook draws its
  randomness from the global generator, which the loader seeds per batch position, or from
  ``mmssl.nn.masking.hook_generator()``; never from a generator it keeps, so a resumed run
  (or another worker count) replays the same masks.
* ``on_step(step)`` after every optimizer step: EMA teachers, temperature annealing.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

BatchHook = Callable[[dict], dict]


class Objective(nn.Module):
    #: batch keys ``forward`` reads; the trainer builds the dataset to provide them
    modalities: tuple[str, ...] = ("audio",)

    def forward(self, batch: dict) -> dict[str, Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def batch_hook(self) -> BatchHook | None:
        return None

    def on_step(self, step: int) -> None:
        return None
