"""``mmssl finetune-asr [RECIPE] --init PRETRAIN_RUN|none [key=value ...] [--resume]``: CTC
fine-tuning of a pretrained encoder (``mmssl.train.finetune``, recipe ``ctc``), then decoding
of ``data.valid`` (greedy, or ``--decoder beam [--lm ARPA]``: ``mmssl.eval.decoders``) into
``RUN/wer.json`` (with the checkpoint decoded and the decoding settings) and ``RUN/hyps.jsonl``
(``mmssl.eval.asr``)."""

from __future__ import annotations

import argparse

from mmssl.devices import pick_device
from mmssl.eval.asr import evaluate_run
from mmssl.eval.decoders import add_decoding_arguments, decoding_from_args
from mmssl.train.distributed import env_from_torchrun
from mmssl.train.finetune import finetune, finetune_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "recipe", nargs="?", default="ctc", help="a recipe YAML or shipped recipe name (default: ctc)"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, e.g. data.train=M data.valid=V train.max_steps=100",
    )
    parser.add_argument(
        "--init",
        default=None,
        metavar="PRETRAIN_RUN",
        help="pretraining run folder or checkpoint to start from (its latest checkpoint, "
        "recorded in config.yaml); 'none' for a fresh encoder (objective.encoder, "
        "model.size). Required, except with --resume",
    )
    parser.add_argument("--resume", action="store_true", help="continue the run in train.out_dir")
    add_decoding_arguments(parser)


def run(args: argparse.Namespace) -> int:
    decoding = decoding_from_args(args)  # checked before training
    cfg = finetune_config(args.recipe, args.overrides, args.init, args.resume)
    run_dir = finetune(cfg, args.resume)
    if not env_from_torchrun().is_main:
        return 0
    if cfg.data.valid is None:
        print(f"run folder: {run_dir} (no data.valid to decode)")
        return 0
    device = pick_device(cfg.train.device, option="train.device")
    result = evaluate_run(run_dir, cfg.data.valid, device, decoding=decoding)
    print(
        f"WER on {cfg.data.valid}: {100 * result['wer']:.2f}% "
        f"({result['errors']} errors / {result['words']} words: "
        f"{result['substitutions']} sub, {result['deletions']} del, {result['insertions']} ins)"
    )
    print(f"run folder: {run_dir}")
    return 0
