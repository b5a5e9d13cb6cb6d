"""``mmssl pretrain RECIPE [key=value ...] [--resume]``.

One process, or one per GPU under torchrun (rank and world size from its environment)::

    torchrun --nproc-per-node 8 -m mmssl.cli pretrain hubert model.size=base data.train=...
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig

from mmssl.config import load_run_config, resolve
from mmssl.devices import pick_device
from mmssl.registry import OBJECTIVES, Registry
from mmssl.runs import check_options, resume_config
from mmssl.train.build import StreamBuilder, build_stream, build_trainer, prepare_run_dir
from mmssl.train.distributed import barrier, env_from_torchrun, init_process_group, shutdown
from mmssl.train.loop import StepCallback


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="a recipe YAML, or the name of one in mmssl/configs")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. model.size=tiny train.max_steps=100")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in train.out_dir from its latest checkpoint")


def pretrain(
    cfg: DictConfig,
    resume: bool = False,
    *,
    registry: Registry = OBJECTIVES,
    stream_builder: StreamBuilder = build_stream,
    callbacks: Sequence[StepCallback] = (),
) -> Path:
    """Train from a resolved config; returns the run folder."""
    check_options(cfg, registry)  # a misspelt option fails before the run folder is made
    env = env_from_torchrun()
    device = pick_device(cfg.train.device, env.local_rank, "train.device")
    init_process_group(env, device, cfg.train.dist_timeout_s)
    try:
        run_dir = prepare_run_dir(cfg, resume, env)  # saves cfg as given
        barrier(env)
        # a resumed run with a checkpoint builds its start-from encoders from the copies in its
        # folder (the checkpoint holds the weights); config.yaml keeps the original sources
        _fit(resume_config(cfg) if resume else cfg, env, device, resume, registry, stream_builder, callbacks)
    finally:
        shutdown()  # after the trainer (and its DDP/FSDP state) is gone: tearing down in the
        # other order can hang on exit
    return run_dir


def _fit(cfg, env, device, resume, registry, stream_builder, callbacks) -> None:
    trainer = build_trainer(cfg, env, device, registry=registry, stream_builder=stream_builder,
                            callbacks=callbacks)
    if resume and not trainer.resume() and env.is_main:
        print(f"no checkpoint in {trainer.ckpt_dir}; starting from step 0")
    trainer.fit()


def run(args: argparse.Namespace) -> int:
    cfg = resolve(load_run_config(args.recipe, args.overrides, resume=args.resume))
    run_dir = pretrain(cfg, resume=args.resume)
    if env_from_torchrun().is_main:
        print(f"run folder: {run_dir}")
    return 0
