"""Several objectives in one run, training one shared encoder (objective ``multi``).

A recipe lists the parts by name, each with its weight and its own keys::

    objective:
      name: multi
      parts:
        av_hubert: {weight: 1.0, num_classes: 100}              # builds the encoder
        multiview: {name: multiview_contrastive, weight: 0.5}   # trains that same module
        dcca: {weight: 0.1, out_dim: 32}

A part's ``name`` (the objective's registered name) defaults to its label, and its other keys
are its builder's options, checked as the builder's own (``objective.parts.dcca.out_dim=16``
from the command line); ``model.size`` applies to every part. A part set to null is left out
(``objective.parts.dcca=null``).

The first part is built as it would be alone and must have one encoder (``objective.encoder``,
what ``extract``, ``layers``, ``kmeans --checkpoint`` and ``finetune-asr --init`` read); every
later part is built on that module through its builder's ``shared_encoder`` keyword, which
builders offer by registering with ``shares_encoder=True`` (``mmssl.objectives.base``). So the
encoder's parameters exist once: once in the optimizer, and once in a checkpoint, under
``encoder.`` (the other names the parts give the same tensors, such as
``parts.multiview.views.audio_tower.``, are left out when saving and filled in when loading).

``loss = sum_i weight_i * loss_i``, and the output holds every part's outputs under its label
(``av_hubert/loss``, ``multiview/frame_accuracy``...). A part of weight 0 still runs and is
logged but trains nothing. Each part runs its own pass of the encoder (the two-view objectives
two: audio alone, video alone), so a step costs about the sum of the parts' steps. The parts'
``set_step`` and ``on_step`` all run; the loader reads the union of their modalities; the one
part that may have a batch hook (AV-HuBERT's masks) has it run in the data workers, and every
part sees the batch it made (two hooks would write the same keys).
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from mmssl.encoders.base import AudioVisualEncoder, SpeechEncoder
from mmssl.errors import ConfigError
from mmssl.objectives.base import SHARED_ENCODER, BatchHook, Objective
from mmssl.registry import OBJECTIVES

# the builder's default: AV-HuBERT masked prediction with multi-view contrastive learning
DEFAULT_PARTS = {"av_hubert": {"weight": 1.0}, "multiview": {"name": "multiview_contrastive", "weight": 0.5}}
_LABEL = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass
class Part:
    """One entry of ``objective.parts``: its ``label`` (the key, and the prefix of its logged
    outputs), the objective ``name``, its ``weight`` and its builder ``options``."""

    label: str
    name: str
    weight: float
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """Where it is in the config."""
        return f"objective.parts.{self.label}"


def sharing_objectives() -> list[str]:
    """The objectives whose builders take a shared encoder."""
    return [n for n in OBJECTIVES.names() if OBJECTIVES.meta(n).get("shares_encoder")]


def parse_parts(parts: Mapping[str, Any] | None) -> list[Part]:
    """``objective.parts`` (label -> settings; None: ``DEFAULT_PARTS``) as ``Part``s, in order,
    leaving out the parts set to null; a ``ConfigError`` naming the key when it is not a mapping,
    for a bad part (``_part``), when no part is left, or when every weight is 0."""
    if parts is None:
        parts = DEFAULT_PARTS
    if not isinstance(parts, Mapping):
        raise ConfigError(
            f"objective.parts must map part names to their settings ({{dcca: {{weight: 1}}}}), got {parts!r}"
        )
    out = [_part(label, settings) for label, settings in parts.items() if settings is not None]
    if not out:
        raise ConfigError("objective.parts: multi needs at least one part (e.g. {av_hubert: {weight: 1.0}})")
    if not any(part.weight > 0 for part in out):
        raise ConfigError(
            "objective.parts: every part's weight is 0, so nothing would train; give one a weight > 0"
        )
    return out


def _part(label: Any, settings: Any) -> Part:
    """One entry of ``objective.parts``; a ``ConfigError`` naming the key for a label that cannot
    name a submodule, settings that are not a mapping, an unknown objective or one that cannot
    share an encoder, a weight that is not a number >= 0, or ``size`` / ``shared_encoder`` set."""
    key = f"objective.parts.{label}"
    if not isinstance(label, str) or not _LABEL.match(label):
        raise ConfigError(f"{key}: a part's name is letters, digits and _, not starting with a digit")
    if hasattr(nn.ModuleDict, label):  # `train`, `keys`...: taken by the module holding the parts
        raise ConfigError(
            f"{key}: {label!r} names a method of the module that holds the parts; rename the part"
        )
    if not isinstance(settings, Mapping):
        raise ConfigError(
            f"{key} must be a mapping of the part's settings (or null to leave it out), got {settings!r}"
        )
    options = dict(settings)
    name = options.pop("name", label)
    if name not in OBJECTIVES:
        where = (
            f"{key}.name: unknown objective {name!r}"
            if "name" in settings
            else f"{key}: no objective is named {label!r} (set {key}.name)"
        )
        raise ConfigError(f"{where}; objectives that can be parts: {', '.join(sharing_objectives())}")
    if not OBJECTIVES.meta(name).get("shares_encoder"):
        raise ConfigError(
            f"{key}: objective {name!r} cannot train a shared encoder; objectives that can: "
            f"{', '.join(sharing_objectives())}"
        )
    weight = options.pop("weight", 1.0)
    if (
        isinstance(weight, bool)
        or not isinstance(weight, (int, float))
        or not math.isfinite(weight)
        or weight < 0
    ):
        raise ConfigError(f"{key}.weight must be a number >= 0, got {weight!r}")
    if "size" in options:
        raise ConfigError(f"{key}.size: every part trains one encoder of model.size; set model.size")
    if SHARED_ENCODER in options:
        raise ConfigError(
            f"unknown config key {key}.{SHARED_ENCODER} (multi gives each part the shared encoder)"
        )
    return Part(label, name, float(weight), options)


def in_part(message: str, part: Part) -> str:
    """A builder's error about its own keys (``objective.masking_type``) renamed to the part's
    keys (``objective.parts.av_hubert.masking_type``); prefixed with the part's key when it
    names none."""
    renamed = re.sub(r"\bobjective\.(?!parts\.)", f"{part.key}.", message)
    return renamed if f"{part.key}." in renamed else f"{part.key} ({part.name}): {message}"


def encoder_modalities(encoder: nn.Module) -> tuple[str, ...]:
    """The modalities an encoder reads."""
    return encoder.modalities if isinstance(encoder, AudioVisualEncoder) else ("audio",)


class MultiObjective(Objective):
    """``parts`` (label -> objective) that all train ``encoder``, combined with ``weights``
    (label -> weight >= 0). ``forward(batch)`` runs every part on the batch and returns
    ``loss = sum weight * part loss`` and each part's outputs as ``<label>/<key>``."""

    def __init__(
        self, encoder: nn.Module, parts: Mapping[str, Objective], weights: Mapping[str, float]
    ) -> None:
        super().__init__()
        if not parts or set(parts) != set(weights):
            raise ValueError(
                f"multi: parts {list(parts)} and weights {list(weights)} must name the same parts"
            )
        self.encoder = encoder  # registered first: its tensors keep their `encoder.` names
        self.parts = nn.ModuleDict(parts)
        for label, part in parts.items():
            if not any(module is encoder for module in part.modules()):
                raise ConfigError(
                    f"objective.parts.{label}: {type(part).__name__} does not train the shared encoder"
                )
        self.weights = {label: float(weights[label]) for label in parts}
        self.modalities = tuple(dict.fromkeys(m for part in parts.values() for m in part.modalities))
        hooks = [label for label, part in parts.items() if part.batch_hook() is not None]
        if len(hooks) > 1:
            raise ConfigError(
                f"objective.parts: {' and '.join(hooks)} both make batch keys in the data workers "
                "(masks), which the other would read; keep one of them"
            )
        self.register_state_dict_post_hook(_drop_aliases)
        self.register_load_state_dict_pre_hook(_add_aliases)

    def forward(self, batch: dict) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        total: Tensor | None = None
        for label, part in self.parts.items():
            got = part(dict(batch))  # a part that adds keys leaves the batch of the next alone
            out.update({f"{label}/{key}": value for key, value in got.items()})
            weighted = self.weights[label] * got["loss"]
            total = weighted if total is None else total + weighted
        assert total is not None
        out["loss"] = total
        return out

    def batch_hook(self) -> BatchHook | None:
        hooks = [hook for hook in (part.batch_hook() for part in self.parts.values()) if hook is not None]
        return hooks[0] if hooks else None

    def set_step(self, step: int) -> None:
        for part in self.parts.values():
            part.set_step(step)

    def on_step(self, step: int) -> None:
        for part in self.parts.values():
            part.on_step(step)


def _named_tensors(module: nn.Module) -> Iterable[tuple[str, Tensor]]:
    yield from module.named_parameters(remove_duplicate=False)
    yield from module.named_buffers(remove_duplicate=False)


def tensor_aliases(module: nn.Module) -> dict[str, str]:
    """Every later name of a tensor ``module`` holds under several names (a shared submodule)
    -> its first name."""
    first: dict[int, str] = {}
    aliases = {}
    for name, tensor in _named_tensors(module):
        if id(tensor) in first:
            aliases[name] = first[id(tensor)]
        else:
            first[id(tensor)] = name
    return aliases


def _drop_aliases(module: nn.Module, state: dict, prefix: str, local_metadata: dict) -> None:
    for alias in tensor_aliases(module):
        state.pop(prefix + alias, None)


def _add_aliases(module: nn.Module, state: dict, prefix: str, *args: Any) -> None:
    for alias, name in tensor_aliases(module).items():
        if prefix + name in state and prefix + alias not in state:
            state[prefix + alias] = state[prefix + name]


def _build_part(part: Part, size: str, rank: int, world_size: int, shared: nn.Module | None) -> Objective:
    params = inspect.signature(OBJECTIVES.get(part.name)).parameters
    kwargs = {"size": size, **part.options}
    for key, value in (("rank", rank), ("world_size", world_size)):
        if key in params and key not in kwargs:
            kwargs[key] = value
    if shared is not None:
        kwargs[SHARED_ENCODER] = shared
    try:
        return OBJECTIVES.build(part.name, **kwargs)
    except ConfigError as err:
        raise ConfigError(in_part(str(err), part)) from None
    except TypeError as err:
        raise ConfigError(f"{part.key}: {err}") from None


@OBJECTIVES.register(combines_parts=True)
def multi(
    size: str = "base", parts: dict[str, Any] | None = None, rank: int = 0, world_size: int = 1
) -> MultiObjective:
    """The objectives of ``parts`` (``objective.parts``, see ``parse_parts``; None: AV-HuBERT
    with multi-view contrastive learning at weight 0.5) on one encoder of ``size``: the first
    part builds it, the others are given it."""
    built: dict[str, Objective] = {}
    shared: nn.Module | None = None
    specs = parse_parts(parts)
    for spec in specs:
        part = _build_part(spec, size, rank, world_size, shared)
        if shared is None:
            shared = getattr(part, "encoder", None)
            if not isinstance(shared, (SpeechEncoder, AudioVisualEncoder)):
                raise ConfigError(
                    f"{spec.key}: objective {spec.name!r} has no single encoder to share (it builds its "
                    "own towers); list first a part that has one, e.g. av_hubert"
                )
        # the first part built the encoder for itself; a later one must find its streams there
        missing = [m for m in part.modalities if m not in encoder_modalities(shared)] if built else []
        if missing:
            raise ConfigError(
                f"{spec.key}: objective {spec.name!r} reads {', '.join(missing)}, which the shared encoder "
                f"(built by objective.parts.{specs[0].label}) has no stream for"
            )
        built[spec.label] = part
    assert shared is not None
    return MultiObjective(shared, built, {spec.label: spec.weight for spec in specs})
