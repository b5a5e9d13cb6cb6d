"""``mmssl data check MANIFEST``: decode every record of a manifest and report the bad ones
(``mmssl.data.check``); exit status 1 when any record is bad."""

from __future__ import annotations

import argparse
import os

from mmssl.data.check import DEFAULT_TOLERANCE, check_manifest, format_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("manifest", help="JSON-lines manifest")
    parser.add_argument(
        "--workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="parallel decoding processes (default: up to 8)",
    )
    parser.add_argument(
        "--av-tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help="allowed audio/video duration difference in seconds (default: one frame, 0.04)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    total, problems, notes = check_manifest(
        args.manifest, args.workers, args.av_tolerance, not args.no_progress
    )
    print(format_report(total, problems, notes))
    return 1 if problems else 0
