"""``mmssl data prepare CORPUS --root LOCAL_COPY --out DIR``: manifests from a local copy of a
published corpus (nothing is downloaded; see ``datasets/<corpus>/README.md``).

Writes ``DIR/<split>.jsonl``, ``DIR/skipped.jsonl`` (every entry left out, with its reason)
and ``DIR/prepare.json`` (the summary: records, hours, skipped per split, and the options),
and prints the summary table. Media lengths come from the file headers, read in parallel.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from mmssl.data.prepare import flickr8k, librispeech, lrs3, musan, spokencoco, voxceleb2
from mmssl.data.prepare.common import Listing, format_report, limit_listing, measure, summarise, write_outputs
from mmssl.errors import ConfigError

CORPORA = ("librispeech", "lrs3", "voxceleb2", "spokencoco", "flickr8k", "musan")
# options that only some corpora read -> those corpora
SPECIFIC = {
    "seed": ("lrs3", "musan"),
    "valid_size": ("lrs3",),
    "valid_ids": ("lrs3",),
    "keep_ids": ("voxceleb2",),
    "images": ("spokencoco", "flickr8k"),
    "karpathy": ("spokencoco",),
    "text": ("flickr8k",),
    "link": ("musan",),
    "babble": ("musan",),
    "talkers": ("musan",),
    "babble_seconds": ("musan",),
    "test_fraction": ("musan",),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("corpus", choices=CORPORA, help="which corpus the local copy is")
    parser.add_argument(
        "--root", type=Path, required=True, help="the corpus's folder (see datasets/<corpus>/README.md)"
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the manifests")
    parser.add_argument("--splits", nargs="+", help="only these splits (default: every one present)")
    parser.add_argument(
        "--workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="parallel header readers (default: up to 8)",
    )
    parser.add_argument("--limit", type=int, help="at most N records per split, for a quick trial")
    parser.add_argument(
        "--seed", type=int, help="lrs3, musan: seed of the held-out / train-test draws (default 0)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    group = parser.add_argument_group("corpus options")
    group.add_argument(
        "--valid-size",
        type=int,
        help=f"lrs3: trainval utterances held out as valid (default {lrs3.VALID_SIZE})",
    )
    group.add_argument(
        "--valid-ids", type=Path, help="lrs3: file of held-out ids instead (AV-HuBERT's lrs3-valid.id)"
    )
    group.add_argument(
        "--keep-ids", type=Path, help="voxceleb2: keep only the clips listed (AV-HuBERT's vox-en.id.gz)"
    )
    group.add_argument(
        "--images",
        type=Path,
        help="spokencoco: COCO folder holding train2014/ val2014/ (default ROOT/..); "
        "flickr8k: the image folder (default ROOT/../Flicker8k_Dataset)",
    )
    group.add_argument(
        "--karpathy", type=Path, help="spokencoco: Karpathy's dataset_coco.json -> train/valid/test"
    )
    group.add_argument(
        "--text", type=Path, help="flickr8k: folder of Flickr8k.token.txt and the split lists (default ROOT)"
    )
    group.add_argument(
        "--link", action="store_true", help="musan: OUT/noise/{train,test}/<type>_<n>.wav links to the files"
    )
    group.add_argument(
        "--babble", type=int, help="musan: babble files to mix per split into OUT/noise/<split>/ (default 0)"
    )
    group.add_argument(
        "--talkers", type=int, help=f"musan: speech files per babble file (default {musan.TALKERS})"
    )
    group.add_argument(
        "--babble-seconds", type=float, help=f"musan: babble file length (default {musan.BABBLE_SECONDS:g} s)"
    )
    group.add_argument(
        "--test-fraction", type=float, help="musan: share of each type's files for test (default 0.1)"
    )


def _check_options(args: argparse.Namespace) -> None:
    for name, corpora in SPECIFIC.items():
        value = getattr(args, name)
        if value not in (None, False) and args.corpus not in corpora:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag} applies to {' and '.join(corpora)}, not {args.corpus}")
    if args.valid_size is not None and args.valid_ids is not None:
        raise ConfigError("give --valid-size or --valid-ids, not both")
    if args.limit is not None and args.limit <= 0:
        raise ConfigError(f"--limit must be positive, got {args.limit}")


def _given(**options) -> dict:
    return {k: v for k, v in options.items() if v is not None}


def collect(args: argparse.Namespace) -> Listing:
    """The corpus's listing from the command-line options."""
    root, splits = args.root, args.splits
    if args.corpus == "librispeech":
        return librispeech.collect(root, splits)
    if args.corpus == "lrs3":
        return lrs3.collect(
            root,
            splits,
            progress=not args.quiet,
            **_given(seed=args.seed, valid_size=args.valid_size, valid_ids=args.valid_ids),
        )
    if args.corpus == "voxceleb2":
        return voxceleb2.collect(root, splits, keep_ids=args.keep_ids)
    if args.corpus == "spokencoco":
        return spokencoco.collect(root, splits, images=args.images, karpathy=args.karpathy)
    if args.corpus == "flickr8k":
        return flickr8k.collect(root, splits, images=args.images, text=args.text)
    return musan.collect(root, splits, **_given(seed=args.seed, test_fraction=args.test_fraction))


def prepare(args: argparse.Namespace) -> tuple[dict, str]:
    """List, measure and write -> (the summary, the printable report)."""
    _check_options(args)
    listing = limit_listing(collect(args), args.limit)
    splits, skipped, other_rate = measure(listing, args.workers, not args.quiet)
    if args.corpus == "musan" and (args.link or args.babble):
        added = musan.build_noise_folders(
            args.out,
            splits,
            args.link,
            args.babble or 0,
            workers=args.workers,
            progress=not args.quiet,
            **_given(seed=args.seed, talkers=args.talkers, seconds=args.babble_seconds),
        )
        splits = {split: records + added.get(split, []) for split, records in splits.items()}
    options = {
        k: (str(v) if isinstance(v, Path) else v)
        for k, v in vars(args).items()
        if k not in ("root", "out", "quiet") and v not in (None, False)
    }
    summary = summarise(args.corpus, args.root, splits, skipped, other_rate, options)
    written = write_outputs(args.out, summary, splits, skipped)
    report = format_report(summary, skipped, args.out)
    if written:
        report += "\n\nwrote " + ", ".join(str(p) for p in written)
        report += f"\ncheck them with: mmssl data check {written[0]}"
    return summary, report


def run(args: argparse.Namespace) -> int:
    _, report = prepare(args)
    print(report)
    return 0
