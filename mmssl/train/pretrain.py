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
from mmssl.runs import (
    MODEL_FILE,
    check_checkpoint_fits,
    check_options,
    check_resume,
    has_checkpoint,
    latest_step_dir,
    pin_inits,
    resume_config,
)
from mmssl.train.build import (
    StreamBuilder,
    build_stream,
    build_trainer,
    check_run_dir,
    check_train,
    write_run_dir,
)
from mmssl.train.distributed import DistEnv, barrier, env_from_torchrun, init_process_group, shutdown
from mmssl.train.loop import StepCallback, Trainer


def pretrain(
    cfg: DictConfig,
    resume: bool = False,
    *,
    registry: Registry = OBJECTIVES,
    stream_builder: StreamBuilder = build_stream,
    callbacks: Sequence[StepCallback] = (),
) -> Path:
    """Train from a resolved config; returns the run folder.

    Nothing is written before the run is built and, with ``resume``, has loaded its checkpoint:
    a config that fails (a misspelt or shape-changing key, a bad value, an unreadable manifest)
    leaves the run folder as it was, its ``config.yaml`` included."""
    check_options(cfg, registry)  # a misspelt option fails before the run folder is made
    check_train(cfg.train)
    run_dir = check_run_dir(cfg, resume)
    resumed = resume and has_checkpoint(run_dir)
    cfg = pin_inits(cfg, resumed)  # config.yaml names the checkpoints the run starts from
    changes = check_resume(cfg) if resumed else {}
    env = env_from_torchrun()
    device = pick_device(cfg.train.device, env.local_rank, "train.device")
    init_process_group(env, device, cfg.train.dist_timeout_s)
    try:
        _fit(cfg, env, device, resume, changes, registry, stream_builder, callbacks)
    finally:
        shutdown()  # after the trainer (and its DDP/FSDP state) is gone: tearing down in the
        # other order can hang on exit
    return run_dir


def _fit(cfg, env, device, resume, changes, registry, stream_builder, callbacks) -> None:
    # a resumed run with a checkpoint builds its start-from encoders from the copies in its
    # folder (the checkpoint holds the weights); config.yaml keeps the original sources
    trainer = build_trainer(
        resume_config(cfg) if resume else cfg,
        env,
        device,
        registry=registry,
        stream_builder=stream_builder,
        callbacks=callbacks,
    )
    if resume:
        _resume(trainer, changes, env)
    write_run_dir(cfg, resume, env)
    barrier(env)
    trainer.fit()


def _resume(trainer: Trainer, changes: dict, env: DistEnv) -> None:
    """Load the latest checkpoint, after checking that it fits the model built now (a key that
    reshapes the weights is named, and nothing is loaded); say which settings changed."""
    folder = latest_step_dir(trainer.ckpt_dir)
    if folder is not None:
        check_checkpoint_fits(trainer.objective, folder / MODEL_FILE, changes)
    if not trainer.resume():
        if env.is_main:
            print(f"no checkpoint in {trainer.ckpt_dir}; starting from step 0")
        return
    if changes and env.is_main:
        listed = ", ".join(f"{k}: {old} -> {new}" for k, (old, new) in changes.items())
        print(f"resuming {trainer.run_dir} at step {trainer.step} with changed settings: {listed}")
