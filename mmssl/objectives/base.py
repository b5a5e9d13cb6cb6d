"""The interface between objectives and the trainer.

An objective is an ``nn.Module`` built from injected encoders. ``forward(batch)`` returns
``dict[str, Tensor]``: ``loss`` (scalar, what is minimised), named ``*_loss`` parts and
metrics (accuracy, perplexity, code usage...), all tensors, so the step never syncs with the
host. It never reads globals: objectives that gather across ranks take ``rank`` and
``world_size`` as builder arguments.

Three optional hooks, all called by the trainer:

* ``batch_hook()`` returns a small picklable callable ``(batch) -> batch`` that the data
  workers run after collation, to add CPU tensors such as ``pred_mask`` (so masks are made
  off the training step). ``forward`` must also work without it (it then makes the same
  tensors itself), so tests and evaluation can pass a plain collated batch. A hook draws its
  randomness from the global generator, which the loader seeds per batch position, or from
  ``mmssl.nn.masking.hook_generator()``; never from a generator it keeps, so a resumed run
  (or another worker count) replays the same masks.
* ``set_step(step)`` before every optimizer step, with the number of updates done (0 before
  the first; the checkpoint's step before the first step after a resume): sets every quantity
  scheduled by the update count (Gumbel temperature, EMA decay, a frozen encoder) to its value
  for that step. It must depend on ``step`` alone (call it twice, or after loading weights, and
  nothing changes) and never read the device (no host sync), so a resumed run continues its
  schedules from the step it saved, not from their initial values.
* ``on_step(step)`` after every optimizer step, with the number of updates done (1 after the
  first): what acts on the weights (an EMA teacher's update, clamping a logit scale). Its
  effect is in the weights the checkpoint saves, so a resume never replays it.

Builders registered with ``shares_encoder=True`` take a ``shared_encoder`` keyword
(``SHARED_ENCODER``): an encoder module to train instead of building their own, so several
objectives can train one encoder together (``mmssl.objectives.multi``). It is never a config key.

``size_preset`` picks a builder's settings for ``model.size`` from its table of sizes;
``check_settings`` turns out-of-range sizes and rates into a ``ConfigError`` naming the key.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from mmssl.errors import ConfigError

BatchHook = Callable[[dict], dict]

# the builder keyword through which an objective registered with ``shares_encoder=True``
# receives the encoder it trains (built by another objective); never set from a config
SHARED_ENCODER = "shared_encoder"


@dataclass
class ChainHook:
    """Run picklable batch hooks one after the other (e.g. utterance mixing, then masking)."""

    hooks: tuple[BatchHook, ...]

    def __call__(self, batch: dict) -> dict:
        for hook in self.hooks:
            batch = hook(batch)
        return batch


class Objective(nn.Module):
    #: batch keys ``forward`` reads; the trainer builds the dataset to provide them
    modalities: tuple[str, ...] = ("audio",)

    def forward(self, batch: dict) -> dict[str, Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def batch_hook(self) -> BatchHook | None:
        return None

    def set_step(self, step: int) -> None:
        return None

    def on_step(self, step: int) -> None:
        return None


def size_preset(what: str, size: str, presets: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A copy of ``presets[size]``; ``ConfigError`` naming ``model.size`` and the sizes ``what``
    (the objective) has when there is none."""
    if size not in presets:
        raise ConfigError(f"model.size {size!r}: {what} has sizes {', '.join(presets)}")
    return dict(presets[size])


def check_settings(
    what: str,
    settings: dict[str, Any],
    encoder: dict[str, Any] | None = None,
    minimum: dict[str, int] | None = None,
    fractions: tuple[str, ...] = (),
) -> None:
    """``ConfigError`` unless each ``settings[key]`` of ``minimum`` is an integer >= its
    minimum and each of ``fractions`` (dropout rates) a number in ``[0, 1)`` (keys that
    ``settings`` does not hold are left to the builder's defaults). The error names
    the key as the user set it: ``objective.encoder.<key>`` when ``encoder`` (the builder's
    ``encoder`` overrides) holds it, else ``objective.<key>``; ``what`` names the objective."""

    def fail(key: str, rule: str) -> None:
        where = f"objective.encoder.{key}" if key in (encoder or {}) else f"objective.{key}"
        raise ConfigError(f"{what}: {where} must be {rule}; got {settings[key]!r}")

    for key, low in (minimum or {}).items():
        value = settings.get(key, low)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            fail(key, f"an integer >= {low}")
    for key in fractions:
        value = settings.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            fail(key, "a number in [0, 1)")
