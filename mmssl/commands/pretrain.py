"""``mmssl pretrain RECIPE [key=value ...] [--resume]``: train a recipe into its run folder
(``mmssl.train.pretrain``).

``--init RUN`` starts a new run from another run's weights (continued pretraining, e.g. of a
checkpoint ``mmssl convert`` imported, with its ``config.yaml`` as the recipe)::

    mmssl pretrain runs/hubert_base/config.yaml data.train=M data.labels=KM \
        train.out_dir=runs/hubert_more --init runs/hubert_base

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
    parser.add_argument(
        "--init",
        metavar="RUN",
        help="start a new run from RUN's weights (a run folder, e.g. one of `mmssl convert`, or a "
        "checkpoint folder; train.init): the encoder must match, heads are taken where they fit",
    )


def run(args: argparse.Namespace) -> int:
    overrides = [*args.overrides, *([f"train.init={args.init}"] if args.init else [])]
    cfg = resolve(load_run_config(args.recipe, overrides, resume=args.resume))
    run_dir = pretrain(cfg, resume=args.resume)
    if env_from_torchrun().is_main:
        print(f"run folder: {run_dir}")
    return 0
