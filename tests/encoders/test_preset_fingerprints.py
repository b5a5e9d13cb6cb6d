"""Every encoder preset builds the same modules as when ``preset_fingerprints.json`` was written:
the same parameter and buffer names, shapes and dtypes, the same hyper-parameters (every
module's ``repr`` and plain attributes, e.g. dropout rates, ``layer_drop``, ``pre_norm``), and
the same initial values under ``torch.manual_seed(0)``.

Structure is checked on the full preset built on the meta device (no memory, no time); values
on the preset itself for tiny and CPC sizes, and with ``num_layers=1`` for base and large (the
layers are copies of one another, so one layer checks their wiring and initialisation while
keeping the test fast).

After an intended change to a preset, rewrite the file and say why in the commit:

    python -m tests.encoders.test_preset_fingerprints --write
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import mmssl.encoders  # noqa: F401  (registers the presets)
from mmssl.registry import ENCODERS

FINGERPRINTS = Path(__file__).with_name("preset_fingerprints.json")
PLAIN = (int, float, bool, str)


def _reduced_overrides(name: str) -> dict:
    full_size = name.endswith(("_base", "_large")) and not name.startswith("cpc_")
    return {"num_layers": 1} if full_size else {}


def _plain(value: object) -> bool:
    return isinstance(value, PLAIN) or (isinstance(value, tuple) and all(isinstance(x, PLAIN) for x in value))


def _hyper_parameters(model: nn.Module) -> list:
    """``(module name, repr without children, plain public attributes)`` for every module."""
    rows = []
    for prefix, module in model.named_modules():
        attrs = {
            k: (list(v) if isinstance(v, tuple) else v)
            for k, v in sorted(vars(module).items())
            if not k.startswith("_") and _plain(v)
        }
        rows.append([prefix, type(module).__name__, module.extra_repr(), attrs])
    return rows


def structure_digest(name: str) -> str:
    with torch.device("meta"):
        model = ENCODERS.build(name)
    tensors = [[k, list(v.shape), str(v.dtype)] for k, v in model.state_dict().items()]
    text = json.dumps([tensors, _hyper_parameters(model)], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def value_stats(name: str) -> dict[str, list[float]]:
    """``{tensor name: [sum, l2 norm]}`` (float64) of the preset's initial state under seed 0."""
    torch.manual_seed(0)
    model = ENCODERS.build(name, **_reduced_overrides(name))
    out = {}
    for key, value in model.state_dict().items():
        v = value.detach().double()
        out[key] = [float(f"{float(v.sum()):.9g}"), float(f"{float(v.norm()):.9g}")]
    return out


def fingerprint(name: str) -> dict:
    return {"structure": structure_digest(name), "values": value_stats(name)}


def _saved() -> dict:
    return json.loads(FINGERPRINTS.read_text())


SAVED = _saved() if FINGERPRINTS.is_file() else {}


def test_every_fingerprinted_preset_is_still_registered():
    assert SAVED, f"{FINGERPRINTS} is missing"
    assert sorted(set(SAVED) - set(ENCODERS.names())) == []


@pytest.mark.parametrize("name", sorted(SAVED))
def test_preset_builds_the_fingerprinted_modules(name):
    expected = SAVED[name]
    assert structure_digest(name) == expected["structure"], (
        f"{name}: names, shapes or hyper-parameters changed"
    )
    values = value_stats(name)
    assert list(values) == list(expected["values"]), f"{name}: parameter names or order changed"
    for key, (total, norm) in expected["values"].items():
        got_total, got_norm = values[key]
        assert math.isclose(got_norm, norm, rel_tol=1e-6, abs_tol=1e-9), (
            f"{name}.{key}: norm {got_norm} != {norm}"
        )
        assert math.isclose(got_total, total, rel_tol=1e-5, abs_tol=1e-5 * max(norm, 1.0)), (
            f"{name}.{key}: sum {got_total} != {total}"
        )


def _fingerprinted(name: str) -> bool:
    """Our presets; open_clip's own configs (``clip_*_vit_*``) are open_clip's to keep."""
    return "_vit_" not in name


def write() -> None:
    data = {name: fingerprint(name) for name in ENCODERS.names() if _fingerprinted(name)}
    FINGERPRINTS.write_text(json.dumps(data, indent=0) + "\n")
    print(f"wrote {FINGERPRINTS} ({len(data)} presets)")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python -m tests.encoders.test_preset_fingerprints --write")
    write()
