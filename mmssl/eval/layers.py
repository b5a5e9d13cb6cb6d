"""Layer-wise CCA similarity of a run's encoder to its inputs or to another run, for
``mmssl layers`` (``mmssl.commands.layers``, whose docstring describes the command): the valid
frames of every layer and of the references, pooled over records (:func:`collect`; frame rates
that differ by an integer factor are paired by averaging the faster encoder's frames), and the
report files (:func:`write_report`: ``layers.md``, ``layers.json``, ``layers.png``).

Shape legend: T frames of one record, N frames pooled over records, C channels, L layers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from mmssl.errors import ConfigError, DataError
from mmssl.eval.probes import format_table, plot_layers
from mmssl.eval.record_layers import is_audio_visual, record_layers


def pool_frames(x: Tensor, factor: int) -> Tensor:
    """``x (T, C)`` -> ``(T // factor, C)``: means of consecutive groups of ``factor`` frames
    (an incomplete last group is dropped)."""
    t = x.shape[0] // factor
    return x[: t * factor].reshape(t, factor, x.shape[1]).mean(1)  # (T', C)


def rate_factors(rate_a: float, rate_b: float) -> tuple[int, int]:
    """How many frames of each encoder to average so both reach the slower rate; ``ConfigError``
    unless one rate is an integer multiple of the other."""
    ratio = Fraction(rate_a / rate_b).limit_denominator(1000)
    if ratio.numerator != 1 and ratio.denominator != 1:
        raise ConfigError(
            f"frame rates {rate_a:g} Hz and {rate_b:g} Hz are not integer multiples; "
            f"the runs' frames cannot be paired"
        )
    return ratio.numerator if ratio > 1 else 1, ratio.denominator if ratio < 1 else 1


def collect(
    encoder,
    records: Sequence[dict],
    device: torch.device,
    other=None,
    modalities: Sequence[str] | None = None,
) -> tuple[list[Tensor], dict[str, Tensor]]:
    """Valid frames pooled over ``records``: the layers ``[(N, C)] * L`` of ``encoder`` and the
    references name -> ``(N, D)`` on the same frames (its inputs, or the layers ``"1".."L2"``
    of ``other``). Both encoders in eval mode on ``device``."""
    layers: list[list[Tensor]] = []
    refs: dict[str, list[Tensor]] = {}
    factors = (1, 1)
    for index, record in enumerate(tqdm(records, desc="layers", unit="utt")):
        mine = record_layers(encoder, record, device, modalities)
        if other is None:
            own, theirs = mine.layers[1:], mine.inputs
        else:
            ref = record_layers(other, record, device, modalities if is_audio_visual(other) else None)
            if index == 0:
                factors = rate_factors(mine.frame_rate, ref.frame_rate)
            own = [pool_frames(x, factors[0]) for x in mine.layers[1:]]
            theirs = {str(i): pool_frames(x, factors[1]) for i, x in enumerate(ref.layers[1:], start=1)}
        if refs and set(theirs) != set(
            refs
        ):  # e.g. an audio-visual encoder's lips, on a record without video
            raise DataError(
                f"record {record.get('id')!r} gives the references {', '.join(theirs)} but the records "
                f"before it {', '.join(refs)}: give records with the same modalities (or --modalities)"
            )
        t = min([x.shape[0] for x in own] + [x.shape[0] for x in theirs.values()])  # frames both sides have
        layers = layers or [[] for _ in own]
        for store, x in zip(layers, own):
            store.append(x[:t].cpu())
        for name, x in theirs.items():
            refs.setdefault(name, []).append(x[:t].cpu())
    if not layers:
        raise DataError("no records to compare on")
    return [torch.cat(s) for s in layers], {name: torch.cat(s) for name, s in refs.items()}


def write_report(values: np.ndarray, columns: Sequence[str], out: Path, method: str, about: dict) -> str:
    """``layers.md``, ``layers.json`` and ``layers.png`` in ``out``; returns the Markdown table."""
    rows = [str(i) for i in range(1, values.shape[0] + 1)]
    table = format_table(values, rows, columns)
    title = f"layer-wise {method.upper()} similarity"
    out.mkdir(parents=True, exist_ok=True)
    (out / "layers.md").write_text(f"# {title}\n\n{table}\n", encoding="utf-8")
    doc = {**about, "method": method, "rows": rows, "columns": list(columns), "values": values.tolist()}
    (out / "layers.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    series = columns if about.get("against") is None else [f"other L{c}" for c in columns]
    plot_layers(values, out / "layers.png", series, title=title)
    return table
