"""``mmssl index --run RUN --manifest M --out INDEX_DIR [--batch-size 16] [--ks 1,5,10]
[--device auto|cpu|cuda]``: embed a manifest's images and spoken captions with a
``speech_image`` run into a retrieval index and score recall@K both ways
(``mmssl.eval.retrieval``, whose docstring lists the files written)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mmssl.devices import pick_device
from mmssl.errors import ConfigError, DataError
from mmssl.eval.retrieval import (
    INDEX_FILE,
    build_index,
    check_index_out,
    load_run,
    recall_table,
    recall_warnings,
)
from mmssl.files import read_text


def parse_ks(spec: str) -> list[int]:
    try:
        ks = sorted({int(k) for k in spec.split(",") if k.strip()})
    except ValueError:
        raise ConfigError(f"--ks must be a comma list of positive integers; got {spec!r}") from None
    if not ks or ks[0] < 1:
        raise ConfigError(f"--ks must be a comma list of positive integers; got {spec!r}")
    return ks


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--run", required=True, help="speech_image run folder, checkpoint folder or .safetensors file"
    )
    parser.add_argument(
        "--manifest", required=True, help="image-caption manifest (records with audio, image, group)"
    )
    parser.add_argument("--out", required=True, help="index folder to write")
    parser.add_argument(
        "--batch-size", type=int, default=16, help="captions or images per batch (default 16)"
    )
    parser.add_argument("--ks", default="1,5,10", help="K values of recall@K (default 1,5,10)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be positive; got {args.batch_size}")
    ks = parse_ks(args.ks)
    if not Path(args.manifest).is_file():
        raise DataError(f"{args.manifest}: manifest not found")
    check_index_out(args.out)  # before the run is loaded: --out must be new or an index
    device = pick_device(args.device)
    loaded = load_run(args.run, device)
    recall = build_index(
        loaded, args.manifest, args.out, args.batch_size, ks, device, progress=not args.quiet
    )
    meta = json.loads(read_text(Path(args.out) / INDEX_FILE))
    print(
        f"indexed {meta['images']} images and {meta['captions']} spoken captions of {args.manifest} "
        f"with {loaded.weights} into {args.out}\n"
    )
    print(recall_table(recall, ks))
    for note in recall_warnings(meta["images"], meta["captions"], ks):
        print(f"warning: {note}", file=sys.stderr)
    return 0
