"""``mmssl layers``: layer-wise CCA similarity of a run's encoder to its inputs or to another run.

    mmssl layers --checkpoint RUN --manifest M [--against RUN2 | --against-inputs]
                 [--method cca|svcca|pwcca] [--max-records N] [--modalities audio,video]
                 [--device auto|cpu|cuda] --out DIR

Every transformer layer ``1..L`` of the run's encoder is compared, over the valid frames of the
first ``--max-records`` records of the manifest pooled together, with

* its inputs (default, ``--against-inputs``): for a speech encoder the frontend output
  (``conv`` features of the waveform frontend or stacked ``fbank``) and the projected
  transformer ``input``; for an audio-visual encoder the stacked ``fbank``, the projected
  ``lips`` features and the ``fused`` transformer input;
* or every layer ``1..L2`` of another run's encoder (``--against RUN2``) on the same records.
  When the frame rates differ by an integer factor (a 50 Hz speech encoder against a 25 Hz
  audio-visual one) the faster encoder's frames are averaged in groups to the slower rate.

Scores (``mmssl.eval.probes``): ``cca`` (mean canonical correlation), ``svcca`` (Raghu et al.,
2017) or ``pwcca`` (Morcos et al., 2018; the default). Writes ``DIR/layers.md`` (the table: a
row per layer, a column per reference), ``DIR/layers.json`` (the same values and what made
them) and ``DIR/layers.png`` (a line per reference), and prints the table. Each record is run
alone, so no padded frame enters a covariance.

Shape legend: T frames of one record, N frames pooled over records, C channels, L layers.
"""

from __future__ import annotations

import argparse
import json
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from mmssl.errors import ConfigError, DataError
from mmssl.eval.probes import METHODS



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="run folder, checkpoint folder or .safetensors file")
    parser.add_argument("--manifest", required=True, help="JSON-lines manifest of the records to compare on")
    against = parser.add_mutually_exclusive_group()
    against.add_argument("--against", help="another run whose every layer is a reference")
    against.add_argument("--against-inputs", action="store_true", help="compare with the encoder's inputs (default)")
    parser.add_argument("--method", choices=METHODS, default="pwcca", help="similarity (default pwcca)")
    parser.add_argument("--max-records", type=int, default=100, help="first N records of the manifest (default 100)")
    parser.add_argument("--modalities", help="audio-visual encoders: comma list of audio,video to read (default both)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")


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
        raise ConfigError(f"frame rates {rate_a:g} Hz and {rate_b:g} Hz are not integer multiples; "
                          f"the runs' frames cannot be paired")
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
    from mmssl.eval.record_layers import is_audio_visual, record_layers

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
    from mmssl.eval.probes import format_table, plot_layers

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


def run(args: argparse.Namespace) -> int:
    from mmssl.data.manifest import read_manifest
    from mmssl.devices import pick_device
    from mmssl.eval.extract import parse_modalities
    from mmssl.eval.probes import layerwise_similarity
    from mmssl.runs import load_encoder_from_run

    device = pick_device(args.device)
    if args.max_records < 1:
        raise ConfigError(f"--max-records must be >= 1; got {args.max_records}")
    modalities = parse_modalities(args.modalities)
    records = read_manifest(args.manifest)[: args.max_records]
    if not records:
        raise DataError(f"{args.manifest}: the manifest has no records")
    encoder = load_encoder_from_run(args.checkpoint).to(device)
    other = load_encoder_from_run(args.against).to(device) if args.against else None
    layers, refs = collect(encoder, records, device, other, modalities)
    frames, widest = layers[0].shape[0], max(x.shape[1] for x in [*layers, *refs.values()])
    if frames < 10 * widest:  # CCA estimates need many more frames than dimensions
        print(f"note: {frames} frames for up to {widest} dimensions; CCA scores are unreliable below "
              f"~{10 * widest} frames (raise --max-records)")
    columns = list(refs)
    values = layerwise_similarity(layers, [refs[c] for c in columns], args.method)
    about = {"checkpoint": str(args.checkpoint), "manifest": str(args.manifest), "records": len(records),
             "frames": frames, "against": args.against}
    table = write_report(values, columns, Path(args.out), args.method, about)
    print(table)
    print(f"wrote {Path(args.out) / 'layers.md'}, layers.json and layers.png")
    return 0
