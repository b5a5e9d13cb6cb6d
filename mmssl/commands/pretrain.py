"""``mmssl pretrain RECIPE [key=value ...] [--resume]``: train a recipe into its run folder
(``mmssl.train.pretrain``).

One process, or one per GPU under torchrun (rank and world size from its environment)::

    torchrun --nproc-per-node 8 -m mmssl.cli pretrain hubert model.size=base data.train=...
"""

from __future__ import annotations

import argparse

from mmssl.config import load_run_config, resolve
from mmssl.train.distributed import env_from_torchrun
from mmssl.train.pretrain import pretrain


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="a recipe YAML, or the name of one in mmssl/configs")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, e.g. model.size=tiny train.max_steps=100",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in train.out_dir from its latest checkpoint"
    )


def run(args: argparse.Namespace) -> int:
    cfg = resolve(load_run_config(args.recipe, args.overrides, resume=args.resume))
    run_dir = pretrain(cfg, resume=args.resume)
    if env_from_torchrun().is_main:
        print(f"run folder: {run_dir}")
    return 0
