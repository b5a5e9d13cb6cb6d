"""``mmssl data import TSV [--wrd WRD] --out MANIFEST``: a fairseq / AV-HuBERT ``.tsv`` (and its
``.wrd`` transcripts) as a JSON-lines manifest (``mmssl.data.importers``)."""

from __future__ import annotations

import argparse

from mmssl.data.importers import attach_transcripts, read_tsv, read_wrd
from mmssl.data.manifest import write_manifest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("tsv", help="fairseq / AV-HuBERT .tsv (first line: root folder)")
    parser.add_argument("--wrd", help=".wrd transcripts, one per line in the .tsv order")
    parser.add_argument("--out", required=True, help="JSON-lines manifest to write")


def run(args: argparse.Namespace) -> int:
    records = read_tsv(args.tsv)
    if args.wrd:
        records = attach_transcripts(records, read_wrd(args.wrd), args.wrd)
    out = write_manifest(args.out, records)
    print(f"wrote {len(records)} records to {out}")
    return 0
