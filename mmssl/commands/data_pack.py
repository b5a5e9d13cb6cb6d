"""``mmssl data pack MANIFEST... --out DIR [--shard I/N]``: decode audio and lip crops once into
memory-mapped shards and write manifests that read them (``mmssl.data.store``)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from mmssl.data.store import merge, pack_shard
from mmssl.errors import ConfigError
from mmssl.files import read_text


def parse_shard(spec: str) -> tuple[int, int]:
    """``"I/N"`` (0 <= I < N) -> ``(I, N)``."""
    try:
        i, n = (int(part) for part in spec.split("/"))
    except ValueError:
        raise ConfigError(f"--shard must be I/N with whole numbers (0/4, 1/4...); got {spec!r}") from None
    if not 0 <= i < n:
        raise ConfigError(f"--shard {spec}: I must be in [0, N)")
    return i, n


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "manifests", nargs="+", help="JSON-lines manifests to pack (each to OUT/<its stem>.jsonl)"
    )
    parser.add_argument("--out", required=True, help="folder of the packed files and manifests")
    parser.add_argument(
        "--shard", default="0/1", help="I/N: pack every N-th record from the I-th (default 0/1)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="parallel decoding processes (default: up to 8)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    shard, shards = parse_shard(args.shard)
    stems = [Path(m).stem for m in args.manifests]
    if len(set(stems)) < len(stems):
        raise ConfigError(
            f"manifests {args.manifests} share a file stem; pack them into different --out folders"
        )
    for manifest in args.manifests:
        part = pack_shard(manifest, args.out, shard, shards, args.workers, not args.no_progress)
        skipped = read_text(part.with_name(part.name.replace(".jsonl", ".skipped.jsonl"))).splitlines()
        print(
            f"packed {part}"
            + (f" ({len(skipped)} records left out: see its .skipped.jsonl)" if skipped else "")
        )
        whole = merge(manifest, args.out, shards)
        print(
            f"wrote {whole}: train on it as on {manifest}"
            if whole
            else f"{Path(manifest).name}: the whole manifest is written once all {shards} shards are packed"
        )
    return 0
