"""Whether a stage of ``mmssl demo`` is done and current: its output is there and was made
from the inputs the demo has now (the latest checkpoint of the run it starts from, the layer
it clusters, the weights it indexes). A stage that is not current is run again; a fine-tuning
run made from another checkpoint is removed first, with the runs made from it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from omegaconf import OmegaConf

from mmssl.commands.kmeans import layer_features_name
from mmssl.config import CONFIG_FILE, load_yaml
from mmssl.data.importers import KMEANS_FILE, read_kmeans_state
from mmssl.errors import DataError
from mmssl.eval.noisy import CLEAN, parse_snrs, read_results
from mmssl.files import read_text, sha256_file, write_text
from mmssl.runs import MODEL_FILE, latest_checkpoint, step_dir_name


def started_fromlatest_checkpoint(asr: Path, pretrain: Path, key: str = "objective.encoder_init") -> bool:
    """The run in ``asr`` started from ``pretrain``'s latest checkpoint (the one its
    config.yaml records in ``key``)."""
    latest = latest_checkpoint(pretrain)
    if latest is None or not (asr / CONFIG_FILE).is_file():
        return False
    started = OmegaConf.select(load_yaml(asr / CONFIG_FILE), key)
    return started == str(latest.resolve())


def asr_done(asr: Path, pretrain: Path | None, steps: int) -> bool:
    """``wer.json`` of the fine-tuning run's latest checkpoint, of ``steps`` steps, started from
    the pretraining run's latest checkpoint (``pretrain`` None: from scratch)."""
    latest, wer = latest_checkpoint(asr), asr / "wer.json"
    if (
        latest is None
        or not wer.is_file()
        or (pretrain is not None and not started_fromlatest_checkpoint(asr, pretrain))
    ):
        return False
    return json.loads(read_text(wer)).get("checkpoint") == latest.name and latest.name == step_dir_name(steps)


def clear_stale_asr(
    asr: Path, pretrain: Path | None, key: str = "objective.encoder_init", dependents: tuple[Path, ...] = ()
) -> None:
    """Remove the run ``asr`` when it started from another checkpoint than ``pretrain``'s latest,
    and with it the ``dependents``, runs that started from it (retrained into the same folder,
    it writes checkpoints of the same names, so their records could not tell)."""
    if (
        pretrain is not None
        and (asr / CONFIG_FILE).is_file()
        and not started_fromlatest_checkpoint(asr, pretrain, key)
    ):
        print(f"    {asr} started from another checkpoint of {pretrain}: removed, training it again")
        shutil.rmtree(asr)
        for run in dependents:
            if run.is_dir():
                print(f"    {run} started from {asr}: removed, training it again")
                shutil.rmtree(run)


def clusters_done(km: Path, pretrain: Path, layer: str) -> bool:
    """``kmeans.pt`` of a clustering of ``layer`` of the pretraining run's latest checkpoint."""
    latest = latest_checkpoint(pretrain)
    if latest is None or not (km / KMEANS_FILE).is_file():
        return False
    state = read_kmeans_state(km)
    return state.get("weights") == str((latest / MODEL_FILE).resolve()) and state.get(
        "features"
    ) == layer_features_name(str(pretrain), layer)


def noisy_done(asr: Path, out: Path, noise_types: str, snrs: str) -> bool:
    """``wer.md`` made from the fine-tuning run's latest checkpoint over every test record,
    with a cell for each noise type x SNR asked for."""
    latest = latest_checkpoint(asr)
    if latest is None or not (out / "wer.md").is_file():
        return False
    found, cells = read_results(out / "results.jsonl")
    if found is None or found.get("checkpoint") != str(latest.resolve()) or found.get("limit") is not None:
        return False
    wanted = {
        ("none", CLEAN) if snr == CLEAN else (noise, snr)
        for noise in noise_types.split(",")
        for snr in parse_snrs(snrs)
    }
    return wanted <= {(noise, snr) for noise, snr, _ in cells}


def index_done(index: Path, run: Path) -> bool:
    """``recall.json`` of an index made from the weights of ``run``'s latest checkpoint (its
    path and checksum: a run trained again writes the same step folder with other weights)."""
    latest = latest_checkpoint(run)
    meta = index / "index.json"
    if latest is None or not (index / "recall.json").is_file() or not meta.is_file():
        return False
    made = json.loads(read_text(meta))
    weights = latest / MODEL_FILE
    return made.get("weights") == str(weights.resolve()) and made.get("weights_sha256") == sha256_file(
        weights
    )


# ---------------------------------------------------------------- the recipe each output was made with

RECIPES_FILE = "recipes.json"
# what may change between runs of the demo without making a stage's output stale: how long a
# run trains (``--resume`` continues it), how often it saves and validates, and where and with
# how many loader processes it runs
_NOT_RECIPE_KEYS = (
    "train.max_steps",
    "train.save_every",
    "train.valid_every",
    "train.device",
    "data.num_workers",
)
_NOT_RECIPE_FLAGS = ("--resume", "--overwrite")
_VALUED_FLAGS_NOT_RECIPE = ("--device",)


def recipe(argv: list[str], out: Path) -> list[str]:
    """What in a stage's command line decides its output: ``argv`` less ``_NOT_RECIPE_*``, with
    the demo folder ``out`` written ``<out>`` (the same however ``--out`` is spelt, and after the
    folder moved)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _VALUED_FLAGS_NOT_RECIPE:
            skip = True
        elif arg not in _NOT_RECIPE_FLAGS and arg.split("=", 1)[0] not in _NOT_RECIPE_KEYS:
            kept.append(arg.replace(str(out), "<out>"))
    return kept


def output_of(argv: list[str]) -> Path | None:
    """The file or folder a stage writes: its ``train.out_dir=`` or ``--out``."""
    for arg in argv:
        if arg.startswith("train.out_dir="):
            return Path(arg.split("=", 1)[1])
    if "--out" in argv[:-1]:
        return Path(argv[argv.index("--out") + 1])
    return None


def _paths(argv: list[str]) -> list[Path]:
    """Every path a command line names (as an argument, or as a ``key=value``'s value)."""
    return [Path(arg.split("=", 1)[1] if "=" in arg else arg).absolute() for arg in argv]


def _reads(argv: list[str], output: Path) -> bool:
    """``argv`` names ``output`` or something inside it."""
    target = output.absolute()
    return any(path == target or target in path.parents for path in _paths(argv))


def _key(output: Path, out: Path) -> str:
    return output.absolute().relative_to(out.absolute()).as_posix()


def _inside(output: Path, out: Path) -> bool:
    return out.absolute() in output.absolute().parents


def read_record(path: Path, remedy: str) -> dict | None:
    """A JSON record the demo keeps in its folder (None when there is none); a ``DataError``
    naming the file and the line, and saying what deleting it does (``remedy``), when it is not
    JSON."""
    if not path.is_file():
        return None
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: not JSON ({err.msg}); delete it {remedy}") from None


def _read_recipes(out: Path) -> dict[str, list[str]] | None:
    return read_record(out / RECIPES_FILE, "and the demo redoes every stage")


def clear_changed_recipes(out: Path, argvs: list[list[str]], legacy_marker: str) -> list[Path]:
    """Remove, under the demo folder ``out``, each stage's output made with another recipe than
    its command line has now (``out/recipes.json`` records the recipe of each stage the demo ran,
    ``record_recipe``), and every later output made from a removed one, so that a stage is redone
    rather than skipped or resumed on what the old recipe made (a run trained again writes
    checkpoints of the same names, so the stages after it could not tell). A folder with no
    record but with ``legacy_marker`` (a file every demo writes) was made by a demo that kept
    none: all of its outputs count as changed. Outputs the record does not name are left alone
    (what the demo did not make is never removed). Returns the removed paths."""
    made = _read_recipes(out)
    legacy = made is None and (out / legacy_marker).is_file()
    made = made or {}
    removed: list[Path] = []
    for argv in argvs:
        output = output_of(argv)
        if output is None or not output.exists() or not _inside(output, out):
            continue
        before, now = made.get(_key(output, out)), recipe(argv, out)
        source = next((r for r in removed if _reads(argv, r)), None)
        if source is not None:
            why = f"made from {source}, which is redone"
        elif legacy:
            why = "made by a demo that did not record its recipe"
        elif before is not None and before != now:
            gone = [a for a in before if a not in now][:2]
            new = [a for a in now if a not in before][:2]
            why = f"made with another recipe ({', '.join(gone) or '-'} -> {', '.join(new) or '-'})"
        else:
            continue
        print(f"    {output}: {why}: removed, to be redone")
        shutil.rmtree(output) if output.is_dir() else output.unlink()
        made.pop(_key(output, out), None)
        removed.append(output)
    if removed or legacy:
        write_text(out / RECIPES_FILE, json.dumps(made, indent=1) + "\n")
    return removed


def record_recipe(out: Path, argv: list[str]) -> None:
    """Record in ``out/recipes.json`` the recipe a stage is about to make its output with."""
    output = output_of(argv)
    if output is None or not _inside(output, out):
        return
    made = _read_recipes(out) or {}
    made[_key(output, out)] = recipe(argv, out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / RECIPES_FILE, json.dumps(made, indent=1) + "\n")
