"""``mmssl pretrain`` glue: config -> data layer -> trainer -> run folder, with a test objective
registered in a local registry."""

import json
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from mmssl.config import load_config, resolve
from mmssl.data.manifest import subset_indices
from mmssl.errors import ConfigError
from mmssl.registry import Registry
from mmssl.runs import build_objective, load_weights
from mmssl.train.build import build_schedule, build_stream
from mmssl.train.distributed import DistEnv
from mmssl.train.pretrain import pretrain
from tests.train.toy import ToyObjective, read_metrics

LOCAL = Registry("test objective")


@LOCAL.register
def toy(size: str = "base", dropout: float = 0.1, rank: int = 0, world_size: int = 1) -> ToyObjective:
    objective = ToyObjective(dropout=dropout)
    objective.built_with = (size, rank, world_size)
    return objective


def _write_corpus(folder: Path, n: int = 12) -> Path:
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        samples = int(rng.integers(8, 16)) * 1000
        path = folder / f"u{i}.wav"
        with wave.open(str(path), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(16000)
            w.writeframes((rng.standard_normal(samples) * 3000).astype("<i2").tobytes())
        records.append({"id": f"u{i}", "audio": path.name, "audio_samples": samples})
    manifest = folder / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    return manifest


def _cfg(tmp_path, manifest, *extra):
    return resolve(
        load_config(
            None,
            [
                "objective.name=toy",
                f"data.train={manifest}",
                f"train.out_dir={tmp_path / 'run'}",
                "data.max_seconds_per_batch=3.0",
                "data.num_workers=0",
                "data.min_audio_seconds=0.1",
                "train.log_every=1",
                "train.save_every=2",
                "train.progress=false",
                "train.lr=0.01",
                "train.device=cpu",
                "model.size=tiny",
                *extra,
            ],
        )
    )


def test_pretrain_writes_the_run_folder_and_resumes(tmp_path):
    manifest = _write_corpus(tmp_path)
    run = pretrain(_cfg(tmp_path, manifest, "train.max_steps=3"), registry=LOCAL)
    assert (run / "config.yaml").is_file() and (run / "tb").is_dir()
    first = read_metrics(run)
    assert [r["step"] for r in first] == [1, 2, 3]
    # audio seconds per step: the batch's real samples (not padding) over 16 kHz
    assert all(r["audio_sec_per_sec"] > 0 and r["loss"] > 0 for r in first)
    assert load_weights(run).keys() == ToyObjective().state_dict().keys()
    with pytest.raises(ConfigError, match="--resume"):
        pretrain(_cfg(tmp_path, manifest, "train.max_steps=3"), registry=LOCAL)
    # resuming with a longer horizon continues from step 3 (a fresh run would restart at 1)
    pretrain(_cfg(tmp_path, manifest, "train.max_steps=5"), resume=True, registry=LOCAL)
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 5]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000005"


def test_builder_gets_size_and_distributed_context(tmp_path):
    cfg = _cfg(tmp_path, tmp_path / "x.jsonl", "objective.dropout=0.0")
    objective = build_objective(cfg, 1, 4, LOCAL)
    assert objective.built_with == ("tiny", 1, 4) and objective.drop.p == 0.0
    bad = _cfg(tmp_path, tmp_path / "x.jsonl", "objective.nope=1")
    with pytest.raises(ConfigError, match="unknown config key objective.nope"):
        build_objective(bad, registry=LOCAL)


def test_a_misspelt_option_names_its_key_and_leaves_no_run_folder(tmp_path):
    manifest = _write_corpus(tmp_path, n=2)
    with pytest.raises(ConfigError, match="unknown config key model.sise"):
        pretrain(_cfg(tmp_path, manifest, "model.sise=tiny"), registry=LOCAL)
    with pytest.raises(ConfigError, match="objective.drop_out.*takes: size, dropout"):
        pretrain(_cfg(tmp_path, manifest, "objective.drop_out=0.1"), registry=LOCAL)
    assert not (tmp_path / "run").exists()


def test_schedule_from_config_fractions(tmp_path):
    cfg = _cfg(
        tmp_path,
        tmp_path / "x.jsonl",
        "train.max_steps=100",
        "train.schedule=tri_stage",
        "train.warmup_fraction=0.1",
        "train.hold_fraction=0.4",
        "train.final_lr_scale=0.05",
    )
    schedule = build_schedule(cfg.train)
    assert (schedule.warmup_steps, schedule.hold_steps) == (10, 40)
    assert schedule.lr_at(50) == pytest.approx(0.01)
    assert schedule.lr_at(100) == pytest.approx(0.01 * 0.05)


@LOCAL.register
def toy_classes(size: str = "base", num_classes: int = 100, label_rate: float = 100.0) -> ToyObjective:
    return ToyObjective()


def test_objective_classes_must_match_the_labels_kmeans(tmp_path, capsys):
    labels = tmp_path / "km"
    labels.mkdir()
    torch.save({"k": 500, "label_rate": 50.0}, labels / "kmeans.pt")
    base = ["objective.name=toy_classes", f"data.labels={labels}"]
    with pytest.raises(ConfigError, match="num_classes=100 .* k=500"):
        build_objective(_cfg(tmp_path, tmp_path / "x.jsonl", *base), registry=LOCAL)
    with pytest.raises(ConfigError, match="label_rate=100.0 .* label_rate=50.0"):
        build_objective(
            _cfg(tmp_path, tmp_path / "x.jsonl", *base, "objective.num_classes=500"), registry=LOCAL
        )
    ok = _cfg(tmp_path, tmp_path / "x.jsonl", *base, "objective.num_classes=500", "objective.label_rate=50")
    assert isinstance(build_objective(ok, registry=LOCAL), ToyObjective)
    # more classes than clusters: some classes never occur, which trains; only a note
    more = _cfg(tmp_path, tmp_path / "x.jsonl", *base, "objective.num_classes=600", "objective.label_rate=50")
    assert isinstance(build_objective(more, registry=LOCAL), ToyObjective)
    assert "only k=500" in capsys.readouterr().out


def test_bad_records_are_skipped_and_their_count_logged(tmp_path):
    manifest = _write_corpus(tmp_path, n=12)
    lines = manifest.read_text().splitlines()
    lines[3] = json.dumps({"id": "gone", "audio": "gone.wav", "audio_samples": 12000})
    manifest.write_text("\n".join(lines) + "\n")
    run = pretrain(_cfg(tmp_path, manifest, "train.max_steps=6", "data.max_bad_fraction=0.5"), registry=LOCAL)
    rows = read_metrics(run)
    assert rows[-1]["bad_records"] >= 1  # the missing file was met, skipped and counted
    assert all(r["bad_records"] <= 1 or r["epoch"] >= 1 for r in rows)


def test_train_subset_keeps_the_seeded_records_and_only_in_training(tmp_path):
    manifest = _write_corpus(tmp_path, n=12)
    cfg = _cfg(
        tmp_path, manifest, "data.train_subset=0.25", "data.train_subset_seed=5", f"data.valid={manifest}"
    )
    objective = build_objective(cfg, registry=LOCAL)
    seen = {}
    for split in ("train", "valid"):
        stream = build_stream(cfg, split, objective, DistEnv())
        seen[split] = sorted(stream.dataset[i]["id"] for i in range(len(stream.dataset)))
    records = [json.loads(line)["id"] for line in manifest.read_text().splitlines()]
    assert seen["train"] == sorted(records[i] for i in subset_indices(12, 0.25, seed=5))
    assert len(seen["train"]) == 3 and len(seen["valid"]) == 12
