"""``mmssl index --run RUN --manifest M --out INDEX_DIR [--batch-size 16] [--ks 1,5,10]
[--faiss auto|exact|hnsw|ivf] [--device auto|cpu|cuda]``: embed a manifest's images and spoken
captions with a ``speech_image`` run into a retrieval index and score recall@K both ways
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
from mmssl.eval.search import KINDS
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
    parser.add_argument(
        "--faiss",
        default="auto",
        help="image search: exact | hnsw | ivf | auto (exact below 100k images, hnsw above; default)",
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be positive; got {args.batch_size}")
    ks = parse_ks(args.ks)
    if args.faiss not in KINDS:
        raise ConfigError(f"--faiss must be one of {', '.join(KINDS)}; got {args.faiss!r}")
    if not Path(args.manifest).is_file():
        raise DataError(f"{args.manifest}: manifest not found")
    check_index_out(args.out)  # before the run is loaded: --out must be new or an index
    device = pick_device(args.device)
    loaded = load_run(args.run, device)
    recall = build_index(
        loaded, args.manifest, args.out, args.batch_size, ks, device, not args.quiet, args.faiss
    )
    meta = json.loads(read_text(Path(args.out) / INDEX_FILE))
    print(
        f"indexed {meta['images']} images and {meta['captions']} spoken captions of {args.manifest} "
        f"with {loaded.weights} into {args.out}\n"
    )
    print(recall_table(recall, ks))
    search = meta["search"]
    if search["kind"] != "exact":
        print(
            f"\nimage search: {search['kind']} (FAISS), recall@10 against exact search "
            f"{100 * search['recall_at_10_vs_exact']:.1f} % on the spoken captions"
        )
    for note in recall_warnings(meta["images"], meta["captions"], ks):
        print(f"warning: {note}", file=sys.stderr)
    return 0
