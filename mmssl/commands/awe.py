"""``mmssl awe``: acoustic word embeddings of a run's layers, scored by the same-different task.

    mmssl awe --manifest M [--checkpoint RUN --layer L|L1,L2,...|all] [--no-mfcc]
              [--pool mean|downsample] [--frames N] [--segments FILE]
              [--min-chars N] [--min-duration S] [--max-records N] [--modalities audio,video]
              [--out DIR] [--overwrite] [--device auto|cpu|cuda]

Every spoken word of the manifest's records (their ``align`` word alignments, which the
built-in corpus writes, or ``--segments FILE``: lines of ``RECORD_ID WORD START END`` in
seconds) of at least ``--min-chars`` characters (default 5, as Carlin et al., 2011) and
``--min-duration`` seconds (default 0) is embedded from each chosen layer of the run's encoder
(``--checkpoint``: a run folder, a checkpoint folder or a ``.safetensors`` file; layers count
from 1, 0 is the transformer's input; default ``all``) and from MFCC (39 MFCC + deltas at
100 Hz, as ``mmssl kmeans --features mfcc``, with the mean and variance of each record
normalised; ``--no-mfcc`` leaves it out), by ``--pool mean`` (default) or ``downsample``
(``--frames`` frames sampled uniformly and concatenated, Levin et al., 2013; default 10).
The same-different task (Carlin et al., 2011) ranks every pair of segments by the cosine
distance of their embeddings; its average precision of "same word" is printed per layer.
``mmssl.eval.awe`` holds the definitions. The pairs grow as the square of the segments (10,000
segments: 5 * 10^7 pairs, about 1.5 GB of memory to rank them): ``--max-records`` bounds them.

A speech encoder reads each record's audio (50 Hz frames with the conv frontend); an
audio-visual encoder reads its audio and lip video (25 Hz), or the modalities named by
``--modalities``.

With ``--out DIR``: ``DIR/awe.md`` (the table), ``DIR/awe.json`` (average precision, pairs and
segments per layer and for MFCC, chance, and the settings) and ``DIR/awe.png`` (average
precision against layer, MFCC as a dashed line, chance as a dotted one). Chance is the share
of same-word pairs, the average precision of a random ranking. ``DIR`` is written whole at the
end; one that holds anything is replaced only with ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from mmssl.data.manifest import read_manifest
from mmssl.data.store import record_audio
from mmssl.devices import pick_device
from mmssl.errors import ConfigError, DataError
from mmssl.eval.awe import (
    DOWNSAMPLE_FRAMES,
    POOLS,
    Segment,
    embed_segments,
    keep_segment,
    read_segment_file,
    read_words,
    same_different,
)
from mmssl.eval.extract import parse_layers, parse_modalities
from mmssl.eval.record_layers import modalities_read, num_layers, partial_modalities_note, record_layers
from mmssl.eval.report import line_plot
from mmssl.files import check_new_folder, new_folder, write_text
from mmssl.nn.fbank import mfcc
from mmssl.runs import load_encoder_from_run
from mmssl.tables import markdown_table

MFCC = "mfcc"
MFCC_RATE = 100.0  # Kaldi framing: 10 ms shift


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", required=True, help="JSON-lines manifest of the records")
    parser.add_argument("--checkpoint", help="run folder, checkpoint folder or .safetensors file")
    parser.add_argument(
        "--layer",
        default="all",
        help="transformer layer (1 = first, 0 = their input), a comma list, or 'all'",
    )
    parser.add_argument("--no-mfcc", action="store_true", help="leave out the MFCC baseline")
    parser.add_argument("--pool", choices=POOLS, default="mean", help="mean (default) or downsample")
    parser.add_argument(
        "--frames", type=int, default=DOWNSAMPLE_FRAMES, help="frames kept by --pool downsample (default 10)"
    )
    parser.add_argument(
        "--segments", help="segment file (RECORD_ID WORD START END, seconds) instead of the 'align' files"
    )
    parser.add_argument("--min-chars", type=int, default=5, help="shortest word kept, characters (default 5)")
    parser.add_argument(
        "--min-duration", type=float, default=0.0, help="shortest word kept, seconds (default 0)"
    )
    parser.add_argument("--max-records", type=int, default=None, help="first N records of the manifest")
    parser.add_argument(
        "--modalities", help="audio-visual encoders: comma list of audio,video to read (default both)"
    )
    parser.add_argument("--out", help="output folder for awe.md, awe.json and awe.png")
    parser.add_argument("--overwrite", action="store_true", help="replace --out when it holds anything")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")


def _check(args: argparse.Namespace) -> None:
    if args.frames < 1:
        raise ConfigError(f"--frames must be >= 1; got {args.frames}")
    if args.min_chars < 0 or args.min_duration < 0:
        raise ConfigError("--min-chars and --min-duration must be >= 0")
    if args.max_records is not None and args.max_records < 1:
        raise ConfigError(f"--max-records must be >= 1; got {args.max_records}")
    if args.checkpoint is None and args.no_mfcc:
        raise ConfigError("nothing to evaluate: give --checkpoint, or drop --no-mfcc")


def word_segments(records: list[dict], segment_file: str | None) -> dict[str, list[Segment]]:
    """Record id -> its word segments, from ``segment_file`` or each record's ``align`` file."""
    if segment_file is not None:
        by_record: dict[str, list[Segment]] = {str(r["id"]): [] for r in records}
        for segment in read_segment_file(segment_file):
            if segment.record not in by_record:
                raise DataError(f"{segment_file}: record {segment.record!r} is not in the manifest")
            by_record[segment.record].append(segment)
        return by_record
    missing = [str(r["id"]) for r in records if not r.get("align")]
    if missing:
        raise DataError(
            f"record {missing[0]!r} has no 'align' word alignment ({len(missing)} such records): "
            "give --segments FILE"
        )
    return {str(r["id"]): read_words(r["align"], str(r["id"])) for r in records}


def mfcc_cmvn(record: dict) -> torch.Tensor:
    """``(T, 39)`` MFCC + deltas of a record's audio at 100 Hz, each dimension normalised to
    zero mean and unit variance over the record (cepstral mean and variance normalisation)."""
    if not record.get("audio"):
        raise DataError(f"record {record.get('id')!r}: no 'audio' path")
    x = mfcc(record_audio(record))
    return (x - x.mean(0)) / x.std(0, correction=0).clamp(min=1e-5)


def collect(args, records, segments, encoder, layers, device) -> dict[str, tuple[list, list[str]]]:
    """Embeddings per source (``"mfcc"`` and layer numbers as strings) and the segments' words."""
    sources = ([] if args.no_mfcc else [MFCC]) + [str(layer) for layer in layers]
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in sources}
    words: list[str] = []
    modalities = parse_modalities(args.modalities)
    for record in tqdm(records, desc="awe", unit="utt"):
        kept = [s for s in segments[str(record["id"])] if keep_segment(s, args.min_chars, args.min_duration)]
        if not kept:
            continue
        words += [s.word for s in kept]
        if not args.no_mfcc:
            rows[MFCC].append(embed_segments(mfcc_cmvn(record), kept, MFCC_RATE, args.pool, args.frames))
        if encoder is not None:
            result = record_layers(encoder, record, device, modalities, upto=max(layers))
            for layer in layers:
                x = result.layers[layer]
                rows[str(layer)].append(embed_segments(x, kept, result.frame_rate, args.pool, args.frames))
    return {name: (torch.cat(r) if r else torch.zeros(0, 1), words) for name, r in rows.items()}


def report(results: dict[str, dict], layers: list[int], out: Path | None, about: dict) -> str:
    """The Markdown table; with ``out``, also ``awe.md``, ``awe.json`` and ``awe.png`` there."""
    table = markdown_table(
        ["features", "AP", "segments", "pairs", "same-word pairs"],
        [
            [
                ("MFCC" if name == MFCC else f"layer {name}"),
                r["ap"],
                r["segments"],
                r["pairs"],
                r["same_pairs"],
            ]
            for name, r in results.items()
        ],
        3,
    )
    if out is None:
        return table
    write_text(out / "awe.md", f"# same-different average precision\n\n{table}\n")
    doc = {**about, "results": results}
    write_text(out / "awe.json", json.dumps(doc, indent=2) + "\n")
    x = [str(layer) for layer in layers] or ["-"]
    series, styles = {}, {"MFCC": "--", "chance": ":"}
    if layers:
        series[Path(about["checkpoint"]).name] = [results[str(layer)]["ap"] for layer in layers]
    if MFCC in results:
        series["MFCC"] = [results[MFCC]["ap"]] * len(x)
    series["chance"] = [about["chance"]] * len(x)
    line_plot(
        x,
        series,
        out / "awe.png",
        xlabel="layer",
        ylabel="average precision",
        title=f"same-different AP ({about['pool']} pooling)",
        ylim=(0.0, 1.02),
        styles=styles,
    )
    return table


def run(args: argparse.Namespace) -> int:
    _check(args)
    device = pick_device(args.device)
    records = read_manifest(args.manifest)[: args.max_records]
    if not records:
        raise DataError(f"{args.manifest}: the manifest has no records")
    out = Path(args.out) if args.out else None
    if out is not None:
        check_new_folder(out, args.overwrite)  # before any work
    segments = word_segments(records, args.segments)
    encoder, layers = None, []
    about: dict = {"manifest": str(args.manifest), "checkpoint": args.checkpoint, "pool": args.pool}
    if args.checkpoint is not None:
        encoder = load_encoder_from_run(args.checkpoint).to(device).eval()
        layers = parse_layers(args.layer, num_layers(encoder))
        read = modalities_read(encoder, records, parse_modalities(args.modalities))
        note = partial_modalities_note(encoder, read)
        if note:
            print(f"warning: {note}", file=sys.stderr)
        about.update(frame_rate=float(encoder.frame_rate), modalities_read=read)
    about.update(
        layers=layers,
        frames=args.frames if args.pool == "downsample" else None,
        min_chars=args.min_chars,
        min_duration=args.min_duration,
        segments=args.segments,
        records=len(records),
    )
    embedded = collect(args, records, segments, encoder, layers, device)
    results = {name: same_different(x, words) for name, (x, words) in embedded.items()}
    first = next(iter(results.values()))
    about["chance"] = first["same_pairs"] / first["pairs"]  # the AP of a random ranking
    if all(r["same_pairs"] == 0 for r in results.values()):
        raise DataError(
            f"no two kept word segments are the same word ({first['segments']} "
            "segments): give more records, or lower --min-chars / --min-duration"
        )
    if out is None:
        print(report(results, layers, None, about))
        print(f"chance (a random ranking): {about['chance']:.3f}")
        return 0
    with new_folder(out, args.overwrite) as tmp:
        table = report(results, layers, tmp, about)
    print(table)
    print(f"chance (a random ranking): {about['chance']:.3f}")
    print(f"wrote {out / 'awe.md'}, awe.json and awe.png")
    return 0
