"""``mmssl convert SRC --out RUN [--kind hf|fairseq|avhubert|torchaudio] [--dict DICT] [--units SPM]
[--overwrite]``: a published
checkpoint -> an mmssl run folder that ``extract``, ``layers``, ``kmeans --checkpoint``,
``finetune-asr --init`` and (for a fine-tuned CTC checkpoint) ``eval-noisy`` read.

SRC: a Hugging Face model folder (``config.json`` + ``model.safetensors`` or
``pytorch_model.bin``; ``--kind hf``), a fairseq ``.pt`` file (``--kind fairseq``; AV-HuBERT's
files, ``--kind avhubert``, are told from the model name in their config) or the weights
file of a torchaudio pipeline bundle under the name torchaudio saves it
(``hubert_fairseq_base_ls960.pth``; ``--kind torchaudio``, the architecture is the bundle's);
the kind is guessed when omitted (a folder with ``config.json``: hf; a file named as a
torchaudio bundle's: torchaudio; another file: fairseq).

The run folder is a pretraining run of the encoder's family (objective ``wav2vec2``,
``hubert``, ``wavlm``, ``data2vec`` or ``av_hubert``, ``objective.encoder`` holding the imported
architecture) or, for a CTC checkpoint with its vocabulary, a ``ctc`` run with the head on
character units (``units.model``), or on the word pieces of a fairseq / AV-HuBERT dictionary
when their SentencePiece model is given (``--units``: it becomes ``units.model``). Its one
checkpoint, ``checkpoints/step_00000000``, holds the objective's full state: the imported
encoder and, for a pretraining objective, its own heads freshly initialised (the source's
pretraining heads are not imported, except AV-HuBERT's projection and label embeddings, which
``av_hubert`` has too; ``converted.json`` lists what was dropped).
The folder is written under a temporary name and renamed into place; an existing RUN is
replaced only with ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from omegaconf import OmegaConf

from mmssl.config import DEFAULTS, load_yaml, save_resolved
from mmssl.convert.avhubert import MODEL_NAMES as AV_MODEL_NAMES
from mmssl.convert.avhubert import from_avhubert
from mmssl.convert.common import AV_FAMILY, ImportedEncoder, head_units
from mmssl.convert.fairseq import from_fairseq, model_config
from mmssl.convert.hf import CONFIG, from_hf
from mmssl.convert.safe_load import load_pickle
from mmssl.convert.torchaudio import find_bundle, from_torchaudio_file
from mmssl.data.units import UNITS_FILE, Units
from mmssl.errors import ConfigError, DataError
from mmssl.files import check_new_folder, new_folder, write_text
from mmssl.runs import (
    CHECKPOINTS,
    CONVERTED_FROM,
    LATEST,
    MODEL_FILE,
    STATE_FILE,
    build_objective,
    save_weights,
    step_dir_name,
)
from mmssl.train.checkpoint import save_state

KINDS = ("hf", "fairseq", "avhubert", "torchaudio")
SUMMARY = "converted.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "src",
        help="a Hugging Face model folder, a fairseq .pt checkpoint or a torchaudio bundle's weights file",
    )
    parser.add_argument("--out", required=True, help="the run folder to write")
    parser.add_argument("--kind", choices=KINDS, help="what SRC is (default: guessed from SRC)")
    parser.add_argument(
        "--dict", help="fairseq CTC checkpoints: the letter dictionary (default: dict.ltr.txt beside SRC)"
    )
    parser.add_argument(
        "--units",
        metavar="SPM_MODEL",
        help="fairseq / AV-HuBERT CTC checkpoints whose dictionary holds word pieces: the SentencePiece "
        "model of those pieces (AV-HuBERT's tokenizer_bpe_model); it becomes the run's units",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")


def guess_kind(src: Path) -> str:
    if src.is_dir():
        if (src / CONFIG).is_file():
            return "hf"
        raise DataError(f"{src}: a folder without {CONFIG}; pass --kind (hf reads a Hugging Face folder)")
    if src.is_file():
        return "torchaudio" if find_bundle(src.name) is not None else "fairseq"
    raise DataError(f"{src}: not found")


def import_checkpoint(
    src: Path, kind: str, dictionary: str | None = None, units: str | None = None
) -> ImportedEncoder:
    for flag, value in (("--dict", dictionary), ("--units", units)):
        if value and kind == "hf":
            raise ConfigError(f"{flag} is for fairseq checkpoints; a Hugging Face folder has its vocab.json")
        if value and kind == "torchaudio":
            raise ConfigError(f"{flag} is for fairseq checkpoints; a torchaudio bundle has its labels")
    if kind == "hf":
        return from_hf(src)
    if kind == "torchaudio":
        return from_torchaudio_file(src)
    pieces = Units.load(units) if units else None
    # fairseq and AV-HuBERT files are told apart by the model name in their config
    checkpoint = load_pickle(src)
    name = model_config(checkpoint, str(src)).get("_name") if isinstance(checkpoint, dict) else None
    if kind == "avhubert" or name in AV_MODEL_NAMES:
        return from_avhubert(src, dictionary, checkpoint, pieces)
    return from_fairseq(src, dictionary, checkpoint, pieces)


def run_config(imported: ImportedEncoder, out: Path):
    """The resolved config of the run: the family's pretraining objective with the imported
    architecture, or ``ctc`` on that encoder when the checkpoint has a usable CTC head."""
    options = {k: list(v) if isinstance(v, tuple) else v for k, v in imported.options.items()}
    size = "large" if options["pre_norm"] and imported.family != AV_FAMILY else "base"
    if imported.head is not None:
        objective = {
            "name": "ctc",
            "encoder_init": None,
            "encoder": imported.family,
            "encoder_options": options,
            "units_file": str(out / UNITS_FILE),
            "freeze_steps": 0,
        }
    elif imported.family == AV_FAMILY:
        objective = {"name": "av_hubert", "encoder": options, **imported.objective_options}
    else:
        objective = {"name": imported.family, "encoder": options}
    cfg = load_yaml(DEFAULTS)
    if imported.family == AV_FAMILY:
        cfg.data.modalities = ["audio", "video"]
    cfg.objective = objective
    cfg.model = {"size": size}
    cfg.data.train = None  # a converted run was not trained here: give data.train to train it
    cfg.train.out_dir = str(out)
    return OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))


def load_checked_part(module: torch.nn.Module, state: dict, source: str) -> None:
    """Some of ``module``'s tensors from ``state``; a name it lacks or a wrong shape is a ``DataError``."""
    own = module.state_dict()
    for key, value in state.items():
        if key not in own or tuple(own[key].shape) != tuple(value.shape):
            raise DataError(f"{source}: {key!r} {list(value.shape)} does not fit the {type(module).__name__}")
    module.load_state_dict(state, strict=False)


def build_run(imported: ImportedEncoder, folder: Path, out: Path) -> dict:
    """Write config, units and the checkpoint of the run into ``folder`` (final place ``out``);
    returns the summary."""
    cfg = run_config(imported, out)
    units = None
    summary_extra: dict = {}
    if imported.head is not None:
        units, weight, bias, dropped_tokens = head_units(imported.head, imported.source)
        units.save(folder / UNITS_FILE)
        summary_extra = {"units": units.size - 1, "dropped_tokens": dropped_tokens}
        cfg.objective.units_file = str(folder / UNITS_FILE)  # read now; the saved config names out
    objective = build_objective(cfg)
    encoder = imported.build()
    objective.encoder.load_state_dict(encoder.state_dict())
    if units is not None:
        with torch.no_grad():
            objective.head.weight.copy_(weight)
            objective.head.bias.copy_(bias)
    if imported.objective_state:  # AV-HuBERT's projection and label embeddings
        load_checked_part(objective, imported.objective_state, imported.source)
    teacher = getattr(objective, "teacher", None)
    if teacher is not None:  # data2vec: the teacher starts as the student's transformer
        teacher.load_state_dict(objective.encoder.transformer.state_dict())
    cfg.objective.units_file = str(out / UNITS_FILE) if units is not None else None
    if units is None:
        del cfg.objective["units_file"]
    save_resolved(cfg, folder)
    step = folder / CHECKPOINTS / step_dir_name(0)
    step.mkdir(parents=True)
    save_weights(objective.state_dict(), step / MODEL_FILE)
    # no optimizer or data position: a converted checkpoint starts runs, it does not resume one
    save_state({"step": 0, CONVERTED_FROM: imported.source}, step / STATE_FILE)
    write_text(folder / CHECKPOINTS / LATEST, step.name + "\n")
    summary = {
        "source": imported.source,
        "architecture": imported.architecture,
        "family": imported.family,
        "objective": str(cfg.objective.name),
        "ctc_head": imported.head is not None,
        **summary_extra,
        "dropped": imported.dropped,
        "notes": imported.notes,
    }
    write_text(folder / SUMMARY, json.dumps(summary, indent=2) + "\n")
    return summary


def run(args: argparse.Namespace) -> int:
    src, out = Path(args.src), Path(args.out)
    check_new_folder(out, args.overwrite)  # before reading a large checkpoint
    kind = args.kind or guess_kind(src)
    imported = import_checkpoint(src, kind, args.dict, args.units)
    with new_folder(out, args.overwrite) as folder:
        summary = build_run(imported, folder, out.resolve())
    head = (
        f"a ctc run with {summary['units']} units"
        if summary["ctc_head"]
        else f"a run of objective {summary['objective']}"
    )
    print(f"{src} ({summary['architecture']}) -> {out}: {head}")
    for note in imported.notes:
        print(f"note: {note}")
    if imported.dropped:
        print(f"note: {len(imported.dropped)} source parameters dropped (listed in {out / SUMMARY})")
    return 0
