"""Run folders as things to load: rebuild a run's objective from its ``config.yaml`` and load
its checkpoint, also after the runs it started from have moved away.

Some objectives start from another run: CTC fine-tuning from a pretraining run
(``objective.encoder_init``), speech-image learning from an SSL run (``objective.speech_init``)
or from open_clip weights (``objective.clip_pretrained``). Their builders declare those keys
when they register (``@OBJECTIVES.register(init_runs=(...), init_files=(...))``), and the
files of their own run folder their config names (``run_files``, e.g. CTC's units). A fresh run
copies the config of each run it starts from into ``RUN/init/<key>/`` (with that run's own
``init/`` folder, so chains of runs work); rebuilding the run for its checkpoint then makes the
same encoders from those copies, with no weights, and the checkpoint fills them in. As fairseq
keeps the pretraining arguments inside a fine-tuned checkpoint, a fine-tuned run needs only its
own folder.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from mmssl.errors import DataError

INIT_DIR = "init"
STRUCTURE_ONLY = "STRUCTURE_ONLY"  # marks a copied config: build the encoder, load no weights


def run_dir_of(path: Path) -> Path:
    """The ``mmssl pretrain`` run folder holding ``path`` (the first with a ``config.yaml``)."""
    for folder in [path, *path.parents]:
        if (folder / "config.yaml").is_file():
            return folder
    raise DataError(f"{path}: no config.yaml in this folder or above it (not an `mmssl pretrain` run)")


def _meta(cfg: DictConfig) -> dict:
    """What the objective's builder registered about its options; nothing for a name that is
    not registered (building it reports that)."""
    from mmssl.registry import OBJECTIVES

    import mmssl.objectives  # noqa: F401  (registers the objectives)

    name = OmegaConf.select(cfg, "objective.name")
    return OBJECTIVES.meta(name) if name in OBJECTIVES else {}


def _set(value: object) -> bool:
    return value not in (None, "", "none")


def snapshot_inits(cfg: DictConfig, run_dir: Path) -> list[Path]:
    """Copy the config of every run ``cfg`` starts from into ``run_dir/init/<key>/`` (a fresh
    run; rank 0). Returns the folders written."""
    written = []
    for key in _meta(cfg).get("init_runs", ()):
        source = OmegaConf.select(cfg, f"objective.{key}")
        if not _set(source):
            continue
        path = Path(str(source))
        if not path.exists():
            raise DataError(f"objective.{key}={source}: not found")
        src_run = run_dir_of(path if path.is_dir() else path.parent)
        dst = run_dir / INIT_DIR / key
        if dst.exists():
            shutil.rmtree(dst)
        if (src_run / INIT_DIR).is_dir():
            shutil.copytree(src_run / INIT_DIR, dst / INIT_DIR)
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src_run / "config.yaml", dst / "config.yaml")
        _copy_run_files(OmegaConf.load(src_run / "config.yaml"), src_run, dst)
        (dst / STRUCTURE_ONLY).write_text(f"config of {src_run.resolve()}, copied when this run started\n")
        written.append(dst)
    return written


def _copy_run_files(cfg: DictConfig, src_run: Path, dst: Path) -> None:
    """The files a run's own config names that shape its model (e.g. ``units_file``: the CTC
    head's size) go with the copy of its config."""
    for key in _meta(cfg).get("run_files", ()):
        value = OmegaConf.select(cfg, f"objective.{key}")
        if not _set(value):
            continue
        file = Path(str(value))
        file = file if file.is_file() else src_run / file.name
        if not file.is_file():
            raise DataError(f"{src_run / 'config.yaml'}: objective.{key}={value} not found")
        shutil.copy2(file, dst / file.name)


def _use_copies(cfg: DictConfig, run_dir: Path) -> DictConfig:
    """Point ``cfg``'s start-from keys at the copies in ``run_dir`` (where it has them: runs made
    before copies existed still read the originals) and unset its start-from weight files."""
    meta = _meta(cfg)
    for key in meta.get("init_runs", ()):
        copy = run_dir / INIT_DIR / key
        if _set(OmegaConf.select(cfg, f"objective.{key}")) and (copy / STRUCTURE_ONLY).is_file():
            cfg.objective[key] = str(copy)
    for key in meta.get("init_files", ()):
        if key in cfg.objective:
            cfg.objective[key] = None
    return cfg


def structure_config(run_dir: Path) -> DictConfig:
    """``run_dir``'s config as it rebuilds the run's objective for its own checkpoint: start-from
    runs read from their copies, start-from weight files unset, the run's own files (``run_files``)
    from its folder (also after the folder moved)."""
    cfg = _use_copies(OmegaConf.load(run_dir / "config.yaml"), run_dir)
    for key in _meta(cfg).get("run_files", ()):
        value = OmegaConf.select(cfg, f"objective.{key}")
        if _set(value) and (run_dir / Path(str(value)).name).is_file():
            cfg.objective[key] = str(run_dir / Path(str(value)).name)
    return cfg


def load_objective_from_run(run_dir_or_ckpt: str | os.PathLike, weights: bool = True) -> tuple[torch.nn.Module, Path]:
    """The objective of a run, rebuilt from its config, with the checkpoint's weights (the
    latest one for a run folder; none with ``weights=False`` or for a copied config). Returns
    ``(objective, weights file or run folder)``, the objective in eval mode."""
    from mmssl.train.build import build_objective
    from mmssl.train.checkpoint import load_weights, resolve_weights

    path = Path(run_dir_or_ckpt)
    if not path.exists():
        raise DataError(f"{path}: checkpoint not found")
    run_dir = run_dir_of(path if path.is_dir() else path.parent)
    objective = build_objective(structure_config(run_dir))
    if not weights or (run_dir / STRUCTURE_ONLY).is_file():
        return objective.eval(), run_dir
    file = resolve_weights(path)
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in load_weights(file).items()}
    try:
        missing, unexpected = objective.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shapes that differ: the config and the weights disagree
        raise DataError(f"{file}: weights do not fit the model built from {run_dir / 'config.yaml'}: "
                        f"{str(err).splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise DataError(f"{file}: weights do not match objective {objective.__class__.__name__} of "
                        f"{run_dir / 'config.yaml'} (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return objective.eval(), file


def load_encoder_from_run(run_dir_or_ckpt: str | os.PathLike):
    """The encoder of a run (``objective.encoder``) in eval mode, with its checkpoint's weights;
    ``run_dir_or_ckpt``: a run folder, a checkpoint folder, a ``.safetensors`` file, or a copied
    config (``RUN/init/<key>``: the encoder is built without weights)."""
    objective, source = load_objective_from_run(run_dir_or_ckpt)
    encoder = getattr(objective, "encoder", None)
    if encoder is None or not hasattr(encoder, "contextualize"):
        raise DataError(f"{source}: objective {objective.__class__.__name__} has no single speech or "
                        "audio-visual encoder to read layers from")
    return encoder.eval()


def resume_config(cfg: DictConfig) -> DictConfig:
    """For ``--resume`` of a run that has a checkpoint: a copy of ``cfg`` whose start-from keys
    point at the copies in its folder (the checkpoint holds the weights), so it resumes after its
    sources moved. What builds the run, not what its ``config.yaml`` records."""
    run_dir = Path(str(cfg.train.out_dir))
    if not (run_dir / "checkpoints" / "latest").is_file():
        return cfg  # nothing saved yet: it starts again from its sources
    return _use_copies(copy.deepcopy(cfg), run_dir)
