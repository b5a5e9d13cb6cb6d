"""Config -> batch streams, optimizer and trainer: the thin glue of ``mmssl pretrain``.

The objective itself is built by the run-folder layer (``mmssl.runs.build_objective``, which
also loads the runs it starts from); this module and that one are the only readers of the
config, and everything they build takes plain arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Subset

from mmssl.config import save_resolved
from mmssl.data.collate import collate
from mmssl.data.datasets import MODALITIES, ManifestDataset
from mmssl.data.manifest import subset_indices
from mmssl.data.samplers import BucketBatchSampler
from mmssl.errors import ConfigError, DataError
from mmssl.objectives.base import Objective
from mmssl.registry import OBJECTIVES, Registry
from mmssl.runs import build_objective, has_checkpoint, load_init, snapshot_inits
from mmssl.train.distributed import DistEnv, wrap_model
from mmssl.train.loop import LoopOptions, StepCallback, Trainer
from mmssl.train.optim import Schedule, build_adamw
from mmssl.train.stream import BatchStream

StreamBuilder = Callable[[DictConfig, str, Objective, DistEnv], "BatchStream | None"]


def build_stream(cfg: DictConfig, split: str, objective: Objective, env: DistEnv) -> BatchStream | None:
    """The manifest ``data.<split>`` as a bucketed, sharded, resumable batch stream (None when
    the split is not set). Records outside ``[min_audio_seconds, max_audio_seconds]`` are left out;
    with ``data.train_subset`` the training split keeps only that seeded subset of its records.

    Objectives that read images or text may carry ``image_transform`` / ``text_tokenizer``
    attributes; the dataset uses them to make ``image`` and ``text`` tensors.
    """
    data = cfg.data
    manifest = data[split]
    if manifest is None:
        return None
    if not Path(manifest).is_file():
        raise DataError(f"data.{split}: manifest {manifest} not found")
    wanted = [m for m in dict.fromkeys([*data.modalities, *objective.modalities]) if m in MODALITIES]
    dataset = ManifestDataset(
        manifest,
        modalities=wanted,
        labels=data.labels,
        image_transform=getattr(objective, "image_transform", None),
        text_tokenizer=getattr(objective, "text_tokenizer", None),
        max_bad_fraction=data.max_bad_fraction,
    )
    durations = dataset.durations()
    train = split == "train"
    # the subset is drawn over the whole manifest, so it does not move with the duration limits
    count = len(durations)
    if not count:
        raise DataError(f"data.{split}: manifest {manifest} has no records")
    chosen = subset_indices(count, data.train_subset, data.train_subset_seed) if train else range(count)
    keep = [i for i in chosen if data.min_audio_seconds <= durations[i] <= data.max_audio_seconds]
    if not keep:
        raise DataError(
            f"data.{split}: no record of {manifest} lasts between data.min_audio_seconds="
            f"{data.min_audio_seconds} and data.max_audio_seconds={data.max_audio_seconds}"
        )
    sampler = BucketBatchSampler(
        [durations[i] for i in keep],
        data.max_seconds_per_batch,
        shuffle=train,
        seed=cfg.train.seed,
        rank=env.rank,
        world_size=env.world_size,
    )
    return BatchStream(
        Subset(dataset, keep) if len(keep) < len(durations) else dataset,
        sampler,
        collate,
        hook=objective.batch_hook(),
        num_workers=data.num_workers,
        seed=cfg.train.seed,
        rank=env.rank,
        pin_memory=torch.cuda.is_available() and cfg.train.device != "cpu",
    )


def _has_labels_for(labels: str | None, manifest: str) -> bool:
    """True when no labels are needed, or the labels folder has ``<manifest stem>.km``."""
    if labels is None or not Path(labels).is_dir():
        return True
    return (Path(labels) / f"{Path(manifest).stem}.km").is_file()


def loop_options(train: DictConfig) -> LoopOptions:
    return LoopOptions(
        max_steps=train.max_steps,
        log_every=train.log_every,
        save_every=train.save_every,
        valid_every=train.valid_every,
        grad_clip=train.grad_clip,
        accum_steps=train.accum_steps,
        precision=train.precision,
        max_nonfinite_steps=train.max_nonfinite_steps,
        keep_checkpoints=train.keep_checkpoints,
        progress=train.progress,
        seed=train.seed,
    )


def build_schedule(train: DictConfig) -> Schedule:
    total = int(train.max_steps)
    return Schedule(
        peak_lr=float(train.lr),
        total_steps=total,
        kind=train.schedule,
        warmup_steps=round(train.warmup_fraction * total),
        hold_steps=round(train.hold_fraction * total),
        final_scale=float(train.final_lr_scale),
        init_scale=float(train.init_lr_scale),
    )


def check_train(train: DictConfig) -> None:
    """The ``train`` section's counts and precision, before anything is built or written."""
    if train.max_steps <= 0 or train.log_every <= 0 or train.save_every <= 0 or train.accum_steps <= 0:
        raise ConfigError("train.max_steps, log_every, save_every and accum_steps must be positive")
    if train.precision not in ("bf16", "fp32"):
        raise ConfigError(f"train.precision: {train.precision!r} is not one of bf16, fp32")


def build_trainer(
    cfg: DictConfig,
    env: DistEnv,
    device: torch.device,
    *,
    registry: Registry = OBJECTIVES,
    stream_builder: StreamBuilder = build_stream,
    callbacks: Sequence[StepCallback] = (),
) -> Trainer:
    """Everything ``mmssl pretrain`` runs, from a resolved config; weights start from
    ``train.seed`` (the same on every rank)."""
    train = cfg.train
    check_train(train)
    torch.manual_seed(train.seed)
    objective = build_objective(cfg, env.rank, env.world_size, registry)
    if OmegaConf.select(cfg, "train.init") is not None:  # a fresh run from another's weights
        _start_from(objective, str(cfg.train.init), env)
    objective = objective.to(device)
    stream = stream_builder(cfg, "train", objective, env)
    if stream is None:
        raise ConfigError("data.train is not set")
    valid = None
    if train.valid_every and cfg.data.valid is not None:
        if _has_labels_for(cfg.data.labels, cfg.data.valid):
            valid = stream_builder(cfg, "valid", objective, env)
        elif env.is_main:
            print(
                f"no labels for data.valid in {cfg.data.labels} (run `mmssl kmeans` on {cfg.data.valid} "
                "with the same model); validation is off"
            )
    model = wrap_model(objective, env, device, train.strategy, train.find_unused_parameters)
    if train.compile:
        model.compile()  # in place: parameter names (and checkpoints) keep no `_orig_mod.` prefix
    optimizer = build_adamw(
        model, lr=train.lr, weight_decay=train.weight_decay, betas=tuple(train.betas), eps=train.eps
    )
    return Trainer(
        objective,
        optimizer,
        build_schedule(train),
        stream,
        loop_options(train),
        Path(train.out_dir),
        device=device,
        env=env,
        model=model,
        valid_stream=valid,
        callbacks=callbacks,
    )


def _start_from(objective: torch.nn.Module, source: str, env: DistEnv) -> None:
    """``train.init``: load ``source``'s weights into the new objective and say what was not
    taken (``mmssl.runs.load_init``); the optimizer, schedule and data start afresh."""
    file, as_built, unused = load_init(objective, source)
    if not env.is_main:
        return
    print(f"starting from {file}: the optimizer, schedule and step count start afresh")
    for what, keys in (("kept as built (not in it, or another shape)", as_built), ("not used", unused)):
        if keys:
            more = f" and {len(keys) - 6} more" if len(keys) > 6 else ""
            print(f"  {what}: {', '.join(keys[:6])}{more}")


def check_run_dir(cfg: DictConfig, resume: bool) -> Path:
    """The run folder, after refusing to start a fresh run in one that already holds
    checkpoints (``--resume`` continues it). Writes nothing."""
    run_dir = Path(cfg.train.out_dir)
    if not resume and has_checkpoint(run_dir):  # every rank stops alike
        raise ConfigError(
            f"train.out_dir={run_dir} already holds a run; pass --resume to continue "
            "it or choose another train.out_dir"
        )
    return run_dir


def write_run_dir(cfg: DictConfig, resume: bool, env: DistEnv) -> Path:
    """Save the resolved config in the run folder (rank 0), once the run is built (and, resumed,
    has loaded its checkpoint): a config that fails to build or to load leaves the folder as it
    was. A fresh run also drops an earlier run's ``metrics.jsonl``."""
    run_dir = Path(cfg.train.out_dir)
    if env.is_main:
        if not resume and (run_dir / "metrics.jsonl").exists():
            (run_dir / "metrics.jsonl").unlink()
        save_resolved(cfg, run_dir)
        if not has_checkpoint(run_dir):  # also `--resume` of a run that saved
            snapshot_inits(cfg, run_dir)  # nothing yet: the configs of the runs it starts from
    return run_dir
