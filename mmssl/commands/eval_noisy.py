"""``mmssl eval-noisy --run RUN --manifest M --noise DIR|TYPE=DIR [...]``: WER of a CTC
fine-tuning run over noise types x SNRs, audio-only vs video-only vs audio-visual
(``mmssl.eval.noisy``), greedy or by beam search with a language model (``--decoder beam --lm
ARPA``, ``mmssl.eval.decoders``); writes ``RUN/eval_noisy`` (or ``--out``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from mmssl.errors import ConfigError
from mmssl.eval.decoders import add_decoding_arguments, decoding_from_args
from mmssl.eval.noisy import CLEAN, evaluate, parse_snrs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", type=Path, required=True, help="an `mmssl finetune-asr` run folder")
    parser.add_argument("--manifest", type=Path, required=True, help="test manifest with transcripts")
    parser.add_argument(
        "--noise",
        action="append",
        default=[],
        metavar="DIR|TYPE=DIR",
        help="noise folder with <type>_*.wav files, or TYPE=DIR (repeatable)",
    )
    parser.add_argument(
        "--noise-types", default=None, help="comma-separated noise types (default: all found)"
    )
    parser.add_argument("--snrs", default="clean,20,10,5,0,-5", help="comma-separated SNRs in dB, or clean")
    parser.add_argument(
        "--modalities",
        default=None,
        help="comma-separated conditions: audio, video, audio+video (default: every one the run's "
        "encoder reads: all three for an audio-visual run, audio for an audio-only one)",
    )
    parser.add_argument("--out", type=Path, default=None, help="output folder (default RUN/eval_noisy)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-seconds", type=float, default=60.0, help="padded audio seconds per batch")
    parser.add_argument(
        "--limit", type=int, default=None, help="evaluate only the first N records of the manifest"
    )
    add_decoding_arguments(parser)


def run(args: argparse.Namespace) -> int:
    snrs = parse_snrs(args.snrs)
    decoding = decoding_from_args(args)
    if any(s != CLEAN for s in snrs) and not args.noise:
        raise ConfigError("--snrs has noisy conditions but no --noise folder was given")
    types = [t.strip() for t in args.noise_types.split(",") if t.strip()] if args.noise_types else None
    out = args.out or args.run / "eval_noisy"
    evaluate(
        args.run,
        args.manifest,
        args.noise,
        out,
        types,
        snrs,
        args.modalities,
        args.device,
        args.seed,
        args.batch_seconds,
        limit=args.limit,
        decoding=decoding,
    )
    print(f"results: {out / 'results.jsonl'}, table: {out / 'wer.md'}, plot: {out / 'wer_vs_snr.png'}")
    return 0
