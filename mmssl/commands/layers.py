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
them, with how many records were read with which modalities: an audio-visual encoder given
records without video reads them audio only, and says so) and ``DIR/layers.png`` (a line
per reference), and prints the table. Each record is run alone, so no padded frame enters a
covariance.

Shape legend: T frames of one record, N frames pooled over records, C channels, L layers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmssl.data.manifest import read_manifest
from mmssl.devices import pick_device
from mmssl.errors import ConfigError, DataError
from mmssl.eval.extract import parse_modalities
from mmssl.eval.layers import collect, write_report
from mmssl.eval.probes import METHODS, layerwise_similarity
from mmssl.eval.record_layers import modalities_read, partial_modalities_note
from mmssl.runs import load_encoder_from_run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", required=True, help="run folder, checkpoint folder or .safetensors file"
    )
    parser.add_argument("--manifest", required=True, help="JSON-lines manifest of the records to compare on")
    against = parser.add_mutually_exclusive_group()
    against.add_argument("--against", help="another run whose every layer is a reference")
    against.add_argument(
        "--against-inputs", action="store_true", help="compare with the encoder's inputs (default)"
    )
    parser.add_argument("--method", choices=METHODS, default="pwcca", help="similarity (default pwcca)")
    parser.add_argument(
        "--max-records", type=int, default=100, help="first N records of the manifest (default 100)"
    )
    parser.add_argument(
        "--modalities", help="audio-visual encoders: comma list of audio,video to read (default both)"
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")


def run(args: argparse.Namespace) -> int:
    device = pick_device(args.device)
    if args.max_records < 1:
        raise ConfigError(f"--max-records must be >= 1; got {args.max_records}")
    modalities = parse_modalities(args.modalities)
    records = read_manifest(args.manifest)[: args.max_records]
    if not records:
        raise DataError(f"{args.manifest}: the manifest has no records")
    encoder = load_encoder_from_run(args.checkpoint).to(device)
    other = load_encoder_from_run(args.against).to(device) if args.against else None
    read = modalities_read(encoder, records, modalities)
    note = partial_modalities_note(encoder, read)
    if note:
        print(f"warning: {note}", file=sys.stderr)
    layers, refs = collect(encoder, records, device, other, modalities)
    frames, widest = layers[0].shape[0], max(x.shape[1] for x in [*layers, *refs.values()])
    if frames < 10 * widest:  # CCA estimates need many more frames than dimensions
        print(
            f"note: {frames} frames for up to {widest} dimensions; CCA scores are unreliable below "
            f"~{10 * widest} frames (raise --max-records)"
        )
    columns = list(refs)
    values = layerwise_similarity(layers, [refs[c] for c in columns], args.method)
    about = {
        "checkpoint": str(args.checkpoint),
        "manifest": str(args.manifest),
        "records": len(records),
        "frames": frames,
        "against": args.against,
        "modalities_read": read,  # records per set of modalities the encoder read
        **({"warning": note} if note else {}),
    }
    table = write_report(values, columns, Path(args.out), args.method, about)
    print(table)
    print(f"wrote {Path(args.out) / 'layers.md'}, layers.json and layers.png")
    return 0
