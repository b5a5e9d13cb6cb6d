"""``mmssl lm --manifest M [--order N] --out LM.arpa``: a word n-gram language model of the
transcripts of a manifest (interpolated Kneser-Ney, ``mmssl.data.ngram``), as an ARPA file for
beam search (``mmssl finetune-asr`` and ``mmssl eval-noisy`` with ``--decoder beam --lm``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from mmssl.data.manifest import read_manifest
from mmssl.data.ngram import arpa_text, kneser_ney
from mmssl.errors import DataError
from mmssl.files import check_new_file, write_text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--manifest", type=Path, required=True, help="manifest whose transcripts train the model"
    )
    parser.add_argument("--order", type=int, default=3, help="n of the n-grams (default 3)")
    parser.add_argument("--out", type=Path, required=True, help="the ARPA file to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def run(args: argparse.Namespace) -> int:
    check_new_file(args.out, args.overwrite)
    texts = [r["transcript"] for r in read_manifest(args.manifest) if r.get("transcript")]
    if not texts:
        raise DataError(f"{args.manifest}: no record has a transcript")
    probs, backoffs = kneser_ney(texts, args.order)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, arpa_text(probs, backoffs))
    sizes = ", ".join(f"{len(p) + (k == 0)} {k + 1}-grams" for k, p in enumerate(probs))  # + <s>
    print(f"{args.out}: {args.order}-gram model of {len(texts)} transcripts ({sizes})")
    return 0
