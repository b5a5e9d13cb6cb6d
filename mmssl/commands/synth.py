"""``mmssl synth``: generate the built-in corpus (``mmssl.data.synth``; see ``datasets/synth/README.md``)."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from mmssl.data.synth.corpus import PRESETS, config_for, generate
from mmssl.data.synth.figures import write_figures
from mmssl.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", choices=sorted(PRESETS), default="tiny", help="preset size (default: tiny)")
    parser.add_argument(
        "--hours", type=float, default=None, help="hours of audio-visual speech instead of a preset"
    )
    parser.add_argument("--seed", type=int, default=0, help="the same seed gives the same corpus")
    parser.add_argument("--out", type=Path, help="corpus folder (av/, image/, noise/)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel processes")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--figures", type=Path, help="also render the README's two example PNGs into this folder"
    )


def run(args: argparse.Namespace) -> int:
    if args.out is None and args.figures is None:
        raise ConfigError("give --out DIR (the corpus) and/or --figures DIR (the example PNGs)")
    if args.figures is not None:
        for path in write_figures(args.figures, args.seed):
            print(f"wrote {path}")
    if args.out is None:
        return 0
    cfg = config_for(args.size, args.hours, args.seed)
    start = time.perf_counter()
    summary = generate(cfg, args.out, workers=args.workers, progress=not args.quiet)
    seconds = time.perf_counter() - start
    av, image = summary["counts"]["av"], summary["counts"]["image"]
    print(
        f"wrote {args.out}: av {av['train']}/{av['valid']}/{av['test']} utterances "
        f"({summary['hours']['av']:.2f} h), image captions {image['train']}/{image['valid']}/{image['test']} "
        f"({summary['hours']['image']:.2f} h), "
        f"noise {summary['noise_files']['train']}+{summary['noise_files']['test']} files "
        f"in {seconds:.0f} s"
    )
    return 0
