"""CTC fine-tuning for ASR (``mmssl finetune-asr``, ``mmssl.commands.finetune_asr``): training,
so it lives beside ``pretrain`` and runs on its engine and run folder (config.yaml,
metrics.jsonl, checkpoints/, tb/, ``--resume``).

The start point is required: a pretraining run (its latest checkpoint folder is what
config.yaml records as ``objective.encoder_init``) or ``none`` (a fresh encoder). Before
training, units are trained on the transcripts of ``data.train`` into ``RUN/units.model``
(``mmssl.data.units``). ``--resume`` continues with the run's saved config and, once it has a
checkpoint, rebuilds its encoder from the copy of the pretraining config in ``RUN/init/``
(``mmssl.runs``), so it needs neither the start point nor the pretraining run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mmssl.config import CONFIG_FILE, load_run_config, load_yaml, resolve
from mmssl.data.manifest import read_manifest
from mmssl.data.units import UNITS_FILE, train_units
from mmssl.errors import ConfigError, DataError
from mmssl.runs import MODEL_FILE, check_options, has_checkpoint, resolve_weights
from mmssl.train.build import check_train
from mmssl.train.pretrain import pretrain


def finetune_config(
    recipe: str | None, overrides: Sequence[str], init: str | None, resume: bool
) -> DictConfig:
    """The run's config: recipe < ``overrides`` (``init``, a run, a checkpoint or ``none``, is
    ``objective.encoder_init``); with ``resume`` the run's saved config < ``overrides``. A run
    that starts (no checkpoint yet) names the checkpoint folder ``encoder_init`` resolves to, so
    a rerun starts from the same weights; a run resumed from a checkpoint keeps the one it
    started from (its checkpoint holds the weights, and the resume builds the encoder from the
    copy in its folder)."""
    overrides = list(overrides)
    if recipe is not None and "=" in recipe:  # `mmssl finetune-asr key=value ...`
        recipe, overrides = "ctc", [recipe, *overrides]
    if init is not None:
        init = "null" if init.lower() == "none" else str(Path(init).resolve())
        overrides.append(f"objective.encoder_init={init}")
    cfg = load_run_config(recipe, overrides, resume=resume)
    if OmegaConf.is_missing(cfg.objective, "encoder_init"):
        raise ConfigError(
            "no start point: pass --init RUN (a pretraining run or checkpoint to fine-tune) or "
            "--init none (a fresh objective.encoder of model.size, a from-scratch baseline)"
        )
    cfg = resolve(cfg)
    run_dir = Path(cfg.train.out_dir)
    if resume and has_checkpoint(run_dir):
        kept = load_yaml(run_dir / CONFIG_FILE).objective.encoder_init
        if str(cfg.objective.encoder_init) != str(kept):  # given again, and another one
            print(
                f"note: --resume keeps the run's start point objective.encoder_init={kept or 'none'} (its "
                f"checkpoint holds the weights); {cfg.objective.encoder_init} is not used"
            )
        cfg.objective.encoder_init = kept
        return cfg
    init = OmegaConf.select(cfg, "objective.encoder_init")
    if init not in (None, "", "none"):
        cfg.objective.encoder_init = init_checkpoint(init)
    elif OmegaConf.select(OmegaConf.from_dotlist(overrides), "objective.freeze_steps") is None:
        # the recipe's freeze keeps a pretrained encoder while the head learns; a fresh encoder
        # has nothing to keep, and frozen it would stay random
        freeze = int(OmegaConf.select(cfg, "objective.freeze_steps", default=0) or 0)
        if freeze:
            print(
                f"note: --init none trains the fresh encoder from the first update (the recipe's "
                f"objective.freeze_steps={freeze} is for pretrained encoders; set it to freeze anyway)"
            )
            cfg.objective.freeze_steps = 0
    return cfg


def init_checkpoint(path: str | Path) -> str:
    """The checkpoint folder a start-from run, checkpoint folder or weights file resolves to
    (the latest checkpoint of a run)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"objective.encoder_init={path}: not found")
    weights = resolve_weights(path).resolve()
    return str(weights.parent if weights.name == MODEL_FILE else weights)


def check_freeze(cfg: DictConfig) -> None:
    """A note when the encoder would stay frozen for the whole run."""
    freeze = int(OmegaConf.select(cfg, "objective.freeze_steps", default=0) or 0)
    if freeze >= int(cfg.train.max_steps):
        print(
            f"note: objective.freeze_steps={freeze} >= train.max_steps={cfg.train.max_steps}: the encoder "
            "never trains, only the output layer does (set objective.freeze_steps below train.max_steps, "
            "e.g. a fifth or half of it)"
        )


def prepare_units(cfg: DictConfig, resume: bool) -> Path:
    """Train the units on ``data.train``'s transcripts into ``<out_dir>/units.model`` (kept on
    resume) and point ``objective.units_file`` at it."""
    run_dir = Path(cfg.train.out_dir)
    if not resume and has_checkpoint(run_dir):
        raise ConfigError(
            f"train.out_dir={run_dir} already holds a run; pass --resume to continue "
            "it or choose another train.out_dir"
        )
    path = run_dir / UNITS_FILE
    if not (resume and path.is_file()):
        texts = []
        for record in read_manifest(cfg.data.train):
            if not record.get("transcript"):
                raise DataError(f"{cfg.data.train}: record {record['id']!r} has no transcript")
            texts.append(record["transcript"])
        kind = OmegaConf.select(cfg, "objective.units", default="char")
        vocab = OmegaConf.select(cfg, "objective.vocab_size", default=1000)
        train_units(texts, kind, vocab, f"data.train={cfg.data.train}").save(path)
    cfg.objective.units_file = str(path.resolve())
    return path


def finetune(cfg: DictConfig, resume: bool = False) -> Path:
    """Check the options, train the units and fine-tune with ``mmssl pretrain``'s engine;
    returns the run folder."""
    check_options(cfg)
    check_train(cfg.train)  # before the units are written into the run folder
    check_freeze(cfg)
    prepare_units(cfg, resume)
    return pretrain(cfg, resume=resume)
