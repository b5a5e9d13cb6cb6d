"""Train from a resolved config into its run folder: the engine of ``mmssl pretrain``
(``mmssl.commands.pretrain``) and of ``mmssl finetune-asr`` (``mmssl.train.finetune``).

One process, or one per GPU under torchrun (rank and world size from its environment).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

from mmssl.devices import pick_device
from mmssl.registry import OBJECTIVES, Registry
from mmssl.runs import check_options, resume_config
from mmssl.train.build import StreamBuilder, build_stream, build_trainer, prepare_run_dir
from mmssl.train.distributed import barrier, env_from_torchrun, init_process_group, shutdown
from mmssl.train.loop import StepCallback


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
    trainer = build_trainer(
        cfg, env, device, registry=registry, stream_builder=stream_builder, callbacks=callbacks
    )
    if resume and not trainer.resume() and env.is_main:
        print(f"no checkpoint in {trainer.ckpt_dir}; starting from step 0")
    trainer.fit()
