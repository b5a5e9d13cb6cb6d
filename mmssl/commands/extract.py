"""``mmssl extract``: a trained run's encoder layers for every record of a manifest, on disk.

    mmssl extract --checkpoint RUN_OR_STEP --manifest M --layer L|L1,L2,...|all --out DIR
                  [--dtype float32|float16] [--modalities audio,video] [--shard-mb MB]
                  [--skip-bad] [--device auto|cpu|cuda]

``--checkpoint``: a run folder (its latest checkpoint), a checkpoint folder or a
``.safetensors`` file of ``mmssl pretrain``. Layers count from 1 (transformer layers), 0 is
the transformer's input; ``all`` is ``0..L``. A speech encoder reads each record's audio
(50 Hz for the conv frontend); an audio-visual encoder reads its audio and lip video (25 Hz),
or only the modalities named by ``--modalities``.

Writes, for each layer ``L``, ``DIR/layer_LL/shard_NNNNN.safetensors`` (keys: record ids;
values: ``(T, C)`` features of the record's valid frames, no padding) and one
``DIR/index.jsonl`` with a line per record and layer::

    {"id": ..., "layer": L, "frames": T, "dim": C, "frame_rate": Hz,
     "file": "layer_LL/shard_NNNNN.safetensors"}

plus ``DIR/extract.json`` (checkpoint, manifest, layers, dtype, counts, and how many records
were read with which modalities: an audio-visual encoder given records without video reads
them audio only, and says so). ``DIR`` is written whole (into a hidden folder beside it, then
swapped in): an extraction that fails leaves it as it was, and it must be new, empty or an
earlier extraction. Shards close once
they hold ``--shard-mb`` of features (all layers together), so memory stays bounded.
:func:`load_features` / :func:`iter_features` read a folder back for downstream probes.

A record that cannot be read is an error naming it; with ``--skip-bad`` it is skipped,
counted and listed in ``extract.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmssl.data.manifest import read_manifest
from mmssl.devices import pick_device
from mmssl.errors import ConfigError, DataError
from mmssl.eval.extract import DTYPES, INDEX, SUMMARY, extract, parse_layers, parse_modalities
from mmssl.eval.record_layers import modalities_read, num_layers, partial_modalities_note
from mmssl.files import check_replaceable
from mmssl.runs import load_encoder_from_run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", required=True, help="run folder, checkpoint folder or .safetensors file"
    )
    parser.add_argument("--manifest", required=True, help="JSON-lines manifest of the records to extract")
    parser.add_argument(
        "--layer",
        required=True,
        help="transformer layer (1 = first, 0 = their input), a comma list, or 'all'",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="float32", help="stored precision (default float32)"
    )
    parser.add_argument(
        "--modalities", help="audio-visual encoders: comma list of audio,video to read (default both)"
    )
    parser.add_argument(
        "--shard-mb", type=float, default=256.0, help="close a shard at this size (default 256 MB)"
    )
    parser.add_argument(
        "--skip-bad", action="store_true", help="skip and count unreadable records instead of stopping"
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")


def run(args: argparse.Namespace) -> int:
    device = pick_device(args.device)
    if args.shard_mb <= 0:
        raise ConfigError(f"--shard-mb must be positive; got {args.shard_mb}")
    modalities = parse_modalities(args.modalities)
    records = read_manifest(args.manifest)
    if not records:
        raise DataError(f"{args.manifest}: the manifest has no records")
    check_replaceable(args.out, SUMMARY)  # before the run is loaded
    encoder = load_encoder_from_run(args.checkpoint)
    layers = parse_layers(args.layer, num_layers(encoder))
    read = modalities_read(encoder, records, modalities)
    note = partial_modalities_note(encoder, read)
    if note:
        print(f"warning: {note}", file=sys.stderr)
    out = Path(args.out)
    about = {
        "checkpoint": str(args.checkpoint),
        "manifest": str(args.manifest),
        "layers": layers,
        "dtype": args.dtype,
        "modalities_read": read,  # records per set of modalities the encoder read
        **({"warning": note} if note else {}),
    }
    result = extract(
        encoder,
        records,
        layers,
        out,
        device,
        DTYPES[args.dtype],
        modalities,
        args.skip_bad,
        int(args.shard_mb * (1 << 20)),
        about,
    )
    print(
        f"wrote {out / INDEX}: {result['records']} records x {len(layers)} layer(s) "
        f"at {result['frame_rate']:g} Hz"
        + (
            f"; skipped {len(result['skipped'])} bad record(s), listed in {out / SUMMARY}"
            if result["skipped"]
            else ""
        )
    )
    return 0
