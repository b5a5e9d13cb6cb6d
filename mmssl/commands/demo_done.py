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
from mmssl.eval.noisy import CLEAN, parse_snrs, read_results
from mmssl.files import read_text, sha256_file
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
