"""Run folders: their layout, the objective a config builds, and loading a trained run.

Layout of a run folder (``mmssl pretrain`` and ``mmssl finetune-asr`` write it)::

    config.yaml                         the resolved config the run was built from
    checkpoints/step_00000500/          model.safetensors (the objective's full state) and
                                        train_state.pt (optimizer, schedule, data position...)
    checkpoints/latest                  the name of the newest complete checkpoint folder
    init/<key>/config.yaml              copies of the configs of the runs it started from
    units.model, metrics.jsonl, tb/     ...

Reading a run needs no trainer: this module names the checkpoint folders, reads and writes
weights, and builds the objective of a config (:func:`build_objective`, which the trainer uses
too). Objectives never read run folders; whoever builds one loads the runs it starts from
(open_clip's factory, not its model, loads weights).

Some objectives start from another run: CTC fine-tuning from a pretraining run
(``objective.encoder_init``), speech-image learning from an SSL run (``objective.speech_init``)
or from open_clip weights (``objective.clip_pretrained``). Their builders declare those keys
when they register (``@OBJECTIVES.register(init_runs=(...), init_files=(...))``), and the
files of their own run folder their config names (``run_files``, e.g. CTC's units).
:func:`build_objective` replaces each ``init_runs`` path by the encoder of that run (loaded
with its weights) before it calls the builder, so the builder receives a module. A fresh run
copies the config of each run it starts from into ``RUN/init/<key>/`` (with that run's own
``init/`` folder, so chains of runs work); rebuilding the run for its checkpoint then makes the
same encoders from those copies, with no weights, and the checkpoint fills them in. As fairseq
keeps the pretraining arguments inside a fine-tuned checkpoint, a fine-tuned run needs only its
own folder.
"""

from __future__ import annotations

import copy
import inspect
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

import mmssl.objectives  # noqa: F401  (registers the objectives)
from mmssl.config import CONFIG_FILE, builder_kwargs, check_value, load_yaml, value_kind
from mmssl.data.importers import read_kmeans_state
from mmssl.encoders.base import AudioVisualEncoder, SpeechEncoder
from mmssl.errors import ConfigError, DataError
from mmssl.files import read_text, sha256_file, write_bytes
from mmssl.objectives.base import SHARED_ENCODER, Objective
from mmssl.objectives.multi import parse_parts
from mmssl.registry import OBJECTIVES, Registry

CHECKPOINTS = "checkpoints"
LATEST = "latest"
MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"
# in the train state of a checkpoint `mmssl convert` wrote: its source, and no optimizer state
CONVERTED_FROM = "converted_from"
INIT_DIR = "init"
STRUCTURE_ONLY = "STRUCTURE_ONLY"  # marks a copied config: build the encoder, load no weights
STEP_DIR = re.compile(r"^step_(\d+)$")

# ---------------------------------------------------------------- checkpoint folders


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def step_of(path: str | os.PathLike) -> int | None:
    """The step of a checkpoint folder, or of the weights file inside one; None for another path."""
    path = Path(path)
    match = STEP_DIR.match(path.name) or STEP_DIR.match(path.parent.name)
    return int(match.group(1)) if match else None


def latest_step_dir(ckpt_dir: str | os.PathLike) -> Path | None:
    """The folder ``ckpt_dir/latest`` names, or None when there is no complete checkpoint yet."""
    pointer = Path(ckpt_dir) / LATEST
    if not pointer.is_file():
        return None
    name = read_text(pointer).strip()
    folder = Path(ckpt_dir) / name
    if not STEP_DIR.match(name) or not (folder / MODEL_FILE).is_file() or not (folder / STATE_FILE).is_file():
        raise DataError(f"{pointer}: names {name!r}, which is not a complete checkpoint folder")
    return folder


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder of a run folder, or None."""
    return latest_step_dir(Path(run_dir) / CHECKPOINTS)


def has_checkpoint(run_dir: str | os.PathLike) -> bool:
    """Whether the run folder has saved a checkpoint (its ``latest`` pointer exists)."""
    return (Path(run_dir) / CHECKPOINTS / LATEST).is_file()


def resolve_weights(path: str | os.PathLike) -> Path:
    """A run folder, its ``checkpoints`` folder, a step folder or a ``.safetensors`` file ->
    the weights file (the latest checkpoint when given a folder)."""
    path = Path(path)
    if path.is_file():
        return path
    for ckpt_dir in (path / CHECKPOINTS, path):
        if (ckpt_dir / LATEST).is_file():
            folder = latest_step_dir(ckpt_dir)
            assert folder is not None
            return folder / MODEL_FILE
    if (path / MODEL_FILE).is_file():
        return path / MODEL_FILE
    raise DataError(f"{path}: no checkpoint here (expected a run folder, a step folder or {MODEL_FILE})")


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The objective's state dict from a checkpoint (see ``resolve_weights`` for ``path``)."""
    file = resolve_weights(path)
    try:
        return load_safetensors_bytes(file.read_bytes())
    except Exception as err:  # safetensors raises its own error types
        raise DataError(f"{file}: cannot read weights: {err}") from err


def save_weights(state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Tensors -> safetensors, atomically. Shared storage (tied weights) is stored once per name."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    write_bytes(path, save_safetensors_bytes(tensors))


# ---------------------------------------------------------------- config -> objective


def _set(value: object) -> bool:
    return value not in (None, "", "none")


_ANNOTATED = {"int": int, "float": float, "bool": bool, "str": str, "None": None, "list": list, "tuple": list}
_ANNOTATED |= {"dict": dict, "Mapping": dict, "Sequence": list}


def option_kinds(param: inspect.Parameter) -> list[type | None]:
    """The types a builder option takes (for :func:`mmssl.config.check_value`): from its
    annotation when that is plain (``float``, ``int | None``, ``list[float]``...), else from its
    default; empty (anything) when neither says."""
    annotation = param.annotation
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    if text and annotation is not inspect.Parameter.empty:
        parts = [part.strip().split("[", 1)[0] for part in text.split("|")]
        if all(part in _ANNOTATED for part in parts):
            return [_ANNOTATED[part] for part in parts]
        return []
    if param.default is inspect.Parameter.empty:
        return []
    kind = value_kind(param.default)
    return [kind] if kind is not None else []


def check_options(cfg: DictConfig, registry: Registry = OBJECTIVES) -> Mapping[str, inspect.Parameter]:
    """The builder's parameters, after checking that every ``objective.*`` and ``model.*`` key
    is one of them and of the type it takes (:func:`option_kinds`): an unknown or wrong-typed
    key is a ``ConfigError`` naming it (before any run folder exists). A builder that combines
    objectives (registered with ``combines_parts=True``, e.g. ``multi``) has the keys of each of
    its ``objective.parts`` checked the same way against that part's builder."""
    name = cfg.objective.name
    objective_keys, model_keys = builder_kwargs(cfg.objective), builder_kwargs(cfg.model, drop=())
    clash = sorted(set(objective_keys) & set(model_keys))
    if clash:
        raise ConfigError(f"objective.{clash[0]} and model.{clash[0]} are both set; keep one")
    sections = {"objective": objective_keys, "model": model_keys}
    params = _check_builder_keys(name, "objective", sections, registry)
    if registry.meta(name).get("combines_parts"):
        for part in parse_parts(objective_keys.get("parts")):
            # a part's size is model.size, which the combining builder passes on
            _check_builder_keys(part.name, part.key, {part.key: part.options}, OBJECTIVES, ("size",))
    return params


def _check_builder_keys(
    name: str, where: str, sections: Mapping[str, dict], registry: Registry, given: tuple[str, ...] = ()
) -> Mapping[str, inspect.Parameter]:
    """The parameters of builder ``name`` (config key ``where.name``), after checking the keys
    of ``sections`` (config section -> its keys) against them; ``given``: parameters that the
    code calling the builder sets, left out of the list of keys it takes."""
    try:
        params = inspect.signature(registry.get(name)).parameters
    except KeyError as err:
        raise ConfigError(f"{where}.name: {err.args[0]}") from None
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    # the shared encoder is a module another objective builds, never a config key
    given = ("rank", "world_size", SHARED_ENCODER, *given)
    takes = ", ".join(k for k in params if k not in given)
    for section, keys in sections.items():
        unknown = sorted(k for k in keys if (k not in params and not takes_any) or k == SHARED_ENCODER)
        if unknown:
            raise ConfigError(
                f"unknown config key {section}.{unknown[0]} (objective {name!r} takes: {takes})"
            )
        for key, value in keys.items():
            if key in params:
                check_value(f"{section}.{key}", value, option_kinds(params[key]))
    return params


def _check_labels(
    cfg: DictConfig, kwargs: dict, params: Mapping[str, inspect.Parameter], where: str = "objective"
) -> None:
    """``objective.num_classes`` / ``label_rate`` (under ``where``: a part's keys) against the
    k-means that made ``data.labels`` (its ``kmeans.pt`` records ``k`` and ``label_rate``): fewer
    classes than clusters or another label rate would train on wrong targets (an error); more
    classes than clusters only leaves some unused (a note)."""
    labels = OmegaConf.select(cfg, "data.labels")
    if not labels or not Path(labels).is_dir():
        return
    try:
        info = read_kmeans_state(labels)
    except DataError:  # an unreadable summary is the k-means command's concern, not training's
        return
    for key, source in (("num_classes", "k"), ("label_rate", "label_rate")):
        if key not in params or source not in info:
            continue
        value = kwargs.get(key, params[key].default)
        if value is inspect.Parameter.empty or float(value) == float(info[source]):
            continue
        if key == "num_classes" and value > info[source]:
            print(
                f"note: {where}.num_classes={value} but data.labels={labels} "
                f"has only k={info[source]} clusters"
            )
            continue
        raise ConfigError(
            f"{where}.{key}={value} but data.labels={labels} has {source}={info[source]}; "
            f"set {where}.{key}={info[source]}"
        )


def resolve_inits(name: str, kwargs: dict, registry: Registry = OBJECTIVES) -> dict:
    """``kwargs`` of the builder ``name`` with every option it declares in ``init_runs`` turned
    from the path of a run (or checkpoint, or copied config) into that run's encoder, loaded with
    its weights (None when unset)."""
    out = dict(kwargs)
    for key in registry.meta(name).get("init_runs", ()):
        if key in out:
            out[key] = load_encoder_from_run(out[key]) if _set(out[key]) else None
    return out


def build_objective(
    cfg: DictConfig, rank: int = 0, world_size: int = 1, registry: Registry = OBJECTIVES
) -> Objective:
    """``registry.build(objective.name, size=model.size, **objective keys, **model keys)``, plus
    ``rank``/``world_size`` when the builder takes them; the runs it starts from (``init_runs``)
    are loaded here and given to the builder as modules."""
    name = cfg.objective.name
    params = check_options(cfg, registry)
    kwargs = {**builder_kwargs(cfg.objective), **builder_kwargs(cfg.model, drop=())}
    for key, value in (("rank", rank), ("world_size", world_size)):
        if key in params and key not in kwargs:
            kwargs[key] = value
    _check_labels(cfg, kwargs, params)
    if registry.meta(name).get("combines_parts"):
        for part in parse_parts(kwargs.get("parts")):
            _check_labels(
                cfg, part.options, inspect.signature(OBJECTIVES.get(part.name)).parameters, part.key
            )
    kwargs = resolve_inits(name, kwargs, registry)
    try:
        objective = registry.build(name, **kwargs)
    except TypeError as err:
        raise ConfigError(f"objective {name!r}: {err}") from None
    if not isinstance(objective, torch.nn.Module) or not callable(getattr(objective, "on_step", None)):
        raise ConfigError(f"objective {name!r} did not build an Objective module")
    return objective  # type: ignore[return-value]


# ---------------------------------------------------------------- the runs a run starts from


def run_dir_of(path: str | os.PathLike) -> Path:
    """The run folder holding ``path`` (the first with a ``config.yaml``)."""
    path = Path(path)
    for folder in [path, *path.parents]:
        if (folder / CONFIG_FILE).is_file():
            return folder
    raise DataError(f"{path}: no config.yaml in this folder or above it (not an `mmssl pretrain` run)")


def _meta(cfg: DictConfig) -> dict:
    """What the objective's builder registered about its options; nothing for a name that is
    not registered (building it reports that)."""
    name = OmegaConf.select(cfg, "objective.name")
    return OBJECTIVES.meta(name) if name in OBJECTIVES else {}


def pin_inits(cfg: DictConfig, resumed: bool) -> DictConfig:
    """``cfg`` with each run it starts from (``init_runs``, and ``train.init``: the weights of a
    fresh run, ``pretrain --init``) named by the checkpoint folder it resolves to (a run
    folder: its latest checkpoint), so that ``config.yaml`` records the weights the run started
    from and a rerun starts from the same ones. A ``resumed`` run (one with a checkpoint) keeps
    the start its saved config names. A path that names no checkpoint (a missing one, a copied
    config) is left as given, for the loader to judge."""
    run_dir = Path(str(cfg.train.out_dir))
    saved = load_yaml(run_dir / CONFIG_FILE) if resumed and (run_dir / CONFIG_FILE).is_file() else None
    for key in [*(f"objective.{k}" for k in _meta(cfg).get("init_runs", ())), "train.init"]:
        value = OmegaConf.select(cfg, key)
        if not _set(value):
            continue
        kept = OmegaConf.select(saved, key) if saved is not None else None
        if _set(kept):
            OmegaConf.update(cfg, key, kept)
            continue
        try:
            weights = resolve_weights(str(value)).resolve()
        except DataError:
            continue
        OmegaConf.update(cfg, key, str(weights.parent if weights.name == MODEL_FILE else weights))
    return cfg


def load_init(objective: torch.nn.Module, source: str) -> tuple[Path, list[str], list[str]]:
    """``train.init``: put the weights of ``source`` (a run folder: its latest checkpoint, a
    checkpoint folder or a weights file; e.g. a run of ``mmssl convert``) into a freshly built
    ``objective``, by name. Returns ``(weights file, keys kept as built, keys not used)``.

    The encoder (``objective.encoder``; every tensor when the objective has none) must be
    there whole, in the shapes built: a missing, extra or reshaped encoder tensor is a
    ``DataError`` naming the file and the key, and nothing is loaded. The objective's other
    tensors (its heads) are taken where name and shape agree and otherwise kept as built
    (e.g. a label embedding for another k); the source's tensors the objective has no place
    for (e.g. a CTC head) are not used. Both lists are returned for the caller to say."""
    file = resolve_weights(source)
    weights = load_weights(file)
    own = objective.state_dict()
    strict = "encoder." if isinstance(getattr(objective, "encoder", None), torch.nn.Module) else ""
    take, as_built = {}, []
    for key, value in own.items():
        found = weights.get(key)
        if found is not None and tuple(found.shape) == tuple(value.shape):
            take[key] = found
        elif key.startswith(strict):
            why = "is missing" if found is None else f"has shape {tuple(found.shape)}"
            raise DataError(
                f"train.init={source}: {file}: {key} {why}, the model built has {tuple(value.shape)} "
                "(start from a run of the same encoder: its objective's family, model.size and "
                "encoder options, e.g. its config.yaml as the recipe)"
            )
        else:
            as_built.append(key)
    unused = sorted(set(weights) - set(own))
    extra = [key for key in unused if key.startswith(strict)]
    if extra:
        raise DataError(
            f"train.init={source}: {file}: {extra[0]} has no place in the model built"
            f"{f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''} (another architecture)"
        )
    with torch.no_grad():
        for key, value in take.items():
            target = own[key]
            target.copy_(value.to(dtype=target.dtype))
    return file, as_built, unused


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
        shutil.copy2(src_run / CONFIG_FILE, dst / CONFIG_FILE)
        _copy_run_files(load_yaml(src_run / CONFIG_FILE), src_run, dst)
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
            raise DataError(f"{src_run / CONFIG_FILE}: objective.{key}={value} not found")
        shutil.copy2(file, dst / file.name)


def _use_copies(cfg: DictConfig, run_dir: Path) -> DictConfig:
    """Point ``cfg``'s start-from keys at the copies in ``run_dir`` (where it has them: runs made
    before copies existed still read the originals) and unset its start-from weight files."""
    meta = _meta(cfg)
    for key in meta.get("init_runs", ()):
        copied = run_dir / INIT_DIR / key
        if _set(OmegaConf.select(cfg, f"objective.{key}")) and (copied / STRUCTURE_ONLY).is_file():
            cfg.objective[key] = str(copied)
    for key in meta.get("init_files", ()):
        if key in cfg.objective:
            cfg.objective[key] = None
    return cfg


def structure_config(run_dir: Path) -> DictConfig:
    """``run_dir``'s config as it rebuilds the run's objective for its own checkpoint: start-from
    runs read from their copies, start-from weight files unset, the run's own files (``run_files``)
    from its folder (also after the folder moved), and the data only training reads
    (``train_data``: a noise folder, possibly given relative to where the run trained) unset."""
    cfg = _use_copies(load_yaml(run_dir / CONFIG_FILE), run_dir)
    for key in _meta(cfg).get("run_files", ()):
        value = OmegaConf.select(cfg, f"objective.{key}")
        if _set(value) and (run_dir / Path(str(value)).name).is_file():
            cfg.objective[key] = str(run_dir / Path(str(value)).name)
    _drop_train_data(cfg)
    return cfg


def _drop_train_data(cfg: DictConfig) -> None:
    """Unset in ``cfg`` the options its builders (the objective, and each part of a ``multi``)
    declare as ``train_data``: what a loaded run embeds, decodes or exports does not read them."""
    meta = _meta(cfg)
    for key in meta.get("train_data", ()):
        if _set(OmegaConf.select(cfg, f"objective.{key}")):
            cfg.objective[key] = None
    if meta.get("combines_parts") and OmegaConf.select(cfg, "objective.parts") is not None:
        for part in parse_parts(OmegaConf.to_container(cfg.objective.parts)):
            for key in OBJECTIVES.meta(part.name).get("train_data", ()):
                if _set(part.options.get(key)):
                    cfg.objective.parts[part.label][key] = None


def resume_config(cfg: DictConfig) -> DictConfig:
    """For ``--resume`` of a run that has a checkpoint: a copy of ``cfg`` whose start-from keys
    point at the copies in its folder (the checkpoint holds the weights), so it resumes after its
    sources moved. What builds the run, not what its ``config.yaml`` records."""
    run_dir = Path(str(cfg.train.out_dir))
    if not has_checkpoint(run_dir):
        return cfg  # nothing saved yet: it starts again from its sources
    cfg = _use_copies(copy.deepcopy(cfg), run_dir)
    if OmegaConf.select(cfg, "train.init") is not None:
        cfg.train.init = None  # its weights are in the checkpoint
    return cfg


# ---------------------------------------------------------------- resuming a run

# what a resumed run keeps whatever the command line says: its checkpoint, data position and
# schedule belong to these (a key whose change reshapes the weights is caught by
# ``check_checkpoint_fits`` when the resumed model is built, whatever its name)
KEPT_ON_RESUME = ("objective.name", "model.size", "data.train")
_BUILDER_KEYS = ("objective.", "model.")  # the open sections: keyword arguments of the builder


def _flat(cfg: DictConfig) -> dict[str, object]:
    out: dict[str, object] = {}

    def walk(node: object, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            out[prefix[:-1]] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


def _same_file(a: object, b: object) -> bool:
    """Two manifest paths that name one file, or two files with the same bytes (a moved corpus)."""
    pa, pb = Path(str(a)), Path(str(b))
    if not (pa.is_file() and pb.is_file()):
        return pa.resolve() == pb.resolve()
    return pa.resolve() == pb.resolve() or sha256_file(pa) == sha256_file(pb)


def resume_changes(cfg: DictConfig) -> dict[str, tuple[object, object]]:
    """``key -> (saved value, new value)`` for every key of ``cfg`` that differs from the
    ``config.yaml`` of its run folder (``train.out_dir``); empty when there is none. A builder
    option (``objective.*``, ``model.*``) the saved config lacks is a change from ``"unset"``
    (its builder's default); another key it lacks is not (a run from before the key existed)."""
    saved_file = Path(str(cfg.train.out_dir)) / CONFIG_FILE
    if not saved_file.is_file():
        return {}
    saved, new = _flat(load_yaml(saved_file)), _flat(cfg)
    changes = {k: (saved[k], v) for k, v in new.items() if k in saved and saved[k] != v}
    changes |= {k: ("unset", v) for k, v in new.items() if k not in saved and k.startswith(_BUILDER_KEYS)}
    if "data.train" in changes and _same_file(*changes["data.train"]):
        del changes["data.train"]
    return changes


def check_resume(cfg: DictConfig) -> dict[str, tuple[object, object]]:
    """For ``--resume`` of a run that has a checkpoint: refuse a change of a key the run keeps
    (``KEPT_ON_RESUME``), naming it, before anything is built or written. Returns the other
    changes (``resume_changes``), which the resumed run applies."""
    changes = resume_changes(cfg)
    run_dir = Path(str(cfg.train.out_dir))
    for key in KEPT_ON_RESUME:
        if key in changes:
            old, new = changes[key]
            raise ConfigError(
                f"--resume: {key}={new} but the run in {run_dir} has {key}={old} ({run_dir / CONFIG_FILE}); "
                f"a resumed run keeps its {key}: drop {key}={new}, or start a new run in another "
                "train.out_dir"
            )
    return changes


def checkpoint_shapes(file: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of a ``.safetensors`` file, from its header alone."""
    try:
        with safe_open(str(file), framework="pt") as handle:
            return {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    except Exception as err:  # safetensors raises its own error types
        raise DataError(f"{file}: cannot read weights: {err}") from err


def check_checkpoint_fits(
    model: torch.nn.Module,
    file: str | os.PathLike,
    changes: Mapping[str, tuple[object, object]] | None = None,
) -> None:
    """A ``ConfigError`` when the weights in ``file`` do not fit ``model`` (names or shapes),
    naming the first tensors that differ and the config keys that changed (``changes``), before
    a resumed run loads anything."""
    saved = checkpoint_shapes(file)
    now = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wrong = [
        f"{k}: {list(saved[k])} saved, {list(now[k])} now" for k in now if k in saved and saved[k] != now[k]
    ]
    wrong += [f"{k}: not in the checkpoint" for k in now if k not in saved]
    wrong += [f"{k}: not in the model" for k in saved if k not in now]
    if not wrong:
        return
    changed = [
        f"{k}: {old} -> {new}" for k, (old, new) in (changes or {}).items() if k.startswith(_BUILDER_KEYS)
    ]
    cause = f"changed {', '.join(changed)}" if changed else "the config builds another model"
    raise ConfigError(
        f"--resume: {file} does not fit the model this config builds ({cause}; {'; '.join(wrong[:2])}"
        f"{f' and {len(wrong) - 2} more' if len(wrong) > 2 else ''}); a resumed run keeps its "
        "architecture: drop the change, or start a new run in another train.out_dir"
    )


# ---------------------------------------------------------------- loading a trained run


def load_objective_from_run(
    run_dir_or_ckpt: str | os.PathLike, weights: bool = True, expect: str | None = None
) -> tuple[torch.nn.Module, Path]:
    """The objective of a run, rebuilt from its config, with the checkpoint's weights (the
    latest one for a run folder; none with ``weights=False`` or for a copied config). Returns
    ``(objective, weights file or run folder)``, the objective in eval mode. ``expect``: the
    objective the run must have (a ``ConfigError`` naming the run otherwise)."""
    path = Path(run_dir_or_ckpt)
    if not path.exists():
        raise DataError(f"{path}: checkpoint not found")
    run_dir = run_dir_of(path if path.is_dir() else path.parent)
    cfg = structure_config(run_dir)
    if expect is not None and cfg.objective.name != expect:
        raise ConfigError(f"{run_dir}: objective {cfg.objective.name!r} is not {expect}")
    if not weights or (run_dir / STRUCTURE_ONLY).is_file():
        return build_objective(cfg).eval(), run_dir
    file = resolve_weights(path)  # before building: a run without a checkpoint fails fast
    objective = build_objective(cfg)
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in load_weights(file).items()}
    try:
        missing, unexpected = objective.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shapes that differ: the config and the weights disagree
        raise DataError(
            f"{file}: weights do not fit the model built from {run_dir / CONFIG_FILE}: "
            f"{str(err).splitlines()[-1].strip()}"
        ) from None
    if missing or unexpected:
        raise DataError(
            f"{file}: weights do not match objective {objective.__class__.__name__} of "
            f"{run_dir / CONFIG_FILE} (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return objective.eval(), file


def load_encoder_from_run(run_dir_or_ckpt: str | os.PathLike) -> SpeechEncoder | AudioVisualEncoder:
    """The encoder of a run (``objective.encoder``) in eval mode, with its checkpoint's weights;
    ``run_dir_or_ckpt``: a run folder, a checkpoint folder, a ``.safetensors`` file, or a copied
    config (``RUN/init/<key>``: the encoder is built without weights)."""
    objective, source = load_objective_from_run(run_dir_or_ckpt)
    encoder = getattr(objective, "encoder", None)
    if not isinstance(encoder, (SpeechEncoder, AudioVisualEncoder)):
        raise DataError(
            f"{source}: objective {objective.__class__.__name__} has no single speech or "
            "audio-visual encoder to read layers from"
        )
    return encoder.eval()
