"""Runs that start from other runs load from their own folder: the configs they started from
are copied in (``RUN/init/<key>``), so moving or deleting the pretraining run breaks nothing."""

import shutil

import pytest
import torch

from mmssl.cli import main
from mmssl.config import load_config, save_resolved
from mmssl.eval.asr import load_asr_model
from mmssl.registry import OBJECTIVES
from mmssl.runs import (
    STRUCTURE_ONLY,
    load_encoder_from_run,
    load_weights,
    save_weights,
    structure_config,
)
from mmssl.testing import save_tiny_run


def _finetune(init, out, manifest, steps=1):
    code = main(
        [
            "finetune-asr",
            "--init",
            str(init),
            f"data.train={manifest}",
            f"train.max_steps={steps}",
            f"train.out_dir={out}",
            "train.device=cpu",
            "data.num_workers=0",
            "train.progress=false",
            "data.max_seconds_per_batch=20",
            "train.lr=1e-2",
            "objective.freeze_steps=0",
        ]
    )
    assert code == 0


def _logits(model, batch):
    with torch.no_grad():
        return model.logits(batch)[0]


def test_a_chain_of_fine_tuned_runs_loads_after_its_sources_are_gone(synth_tiny, tmp_path):
    manifest = synth_tiny / "av" / "train.jsonl"
    _, step = save_tiny_run(tmp_path / "pre", "hubert", manifest)
    _finetune(step, tmp_path / "ft1", manifest)
    _finetune(tmp_path / "ft1", tmp_path / "ft2", manifest)  # starts from the first fine-tuned run
    copy = tmp_path / "ft2" / "init" / "encoder_init"
    assert (copy / STRUCTURE_ONLY).is_file() and (copy / "init" / "encoder_init" / "config.yaml").is_file()
    assert (copy / "units.model").is_file()  # the first run's units shape its head

    batch = {"audio": torch.randn(2, 8000), "audio_lens": torch.tensor([8000, 6000])}
    before = _logits(load_asr_model(tmp_path / "ft2", torch.device("cpu")), batch)
    shutil.rmtree(tmp_path / "pre")
    shutil.rmtree(tmp_path / "ft1")
    after = _logits(load_asr_model(tmp_path / "ft2", torch.device("cpu")), batch)
    torch.testing.assert_close(after, before)
    shutil.move(tmp_path / "ft2", tmp_path / "moved")  # the run folder itself may move too
    torch.testing.assert_close(
        _logits(load_asr_model(tmp_path / "moved", torch.device("cpu")), batch), before
    )
    shutil.move(tmp_path / "moved", tmp_path / "ft2")
    # the rebuilt config points at the copies, and a copied config gives an encoder without weights
    assert structure_config(tmp_path / "ft2").objective.encoder_init == str(copy)
    assert load_encoder_from_run(copy).__class__.__name__ == "AudioEncoder"


def test_a_run_trained_with_noise_loads_after_the_noise_folder_is_gone(synth_tiny, tmp_path, monkeypatch):
    # the noise folder is given relative to where the run trained: loading the run from another
    # folder, or after the noise is deleted, must not look for it (only training reads it)
    manifest = synth_tiny / "av" / "train.jsonl"
    _, step = save_tiny_run(tmp_path / "pre", "hubert", manifest)
    shutil.copytree(synth_tiny / "noise" / "train", tmp_path / "noise")
    monkeypatch.chdir(tmp_path)
    code = main(
        [
            "finetune-asr",
            "--init",
            str(step),
            f"data.train={manifest}",
            "objective.noise_dir=noise",
            "objective.noise_prob=1.0",
            "train.max_steps=1",
            f"train.out_dir={tmp_path / 'ft'}",
            "train.device=cpu",
            "data.num_workers=0",
            "train.progress=false",
            "data.max_seconds_per_batch=20",
        ]
    )
    assert code == 0
    batch = {"audio": torch.randn(2, 8000), "audio_lens": torch.tensor([8000, 6000])}
    before = _logits(load_asr_model(tmp_path / "ft", torch.device("cpu")), batch)
    shutil.rmtree(tmp_path / "noise")
    model = load_asr_model(tmp_path / "ft", torch.device("cpu"))
    torch.testing.assert_close(_logits(model, batch), before)
    assert structure_config(tmp_path / "ft").objective.noise_dir is None
    # a run that starts from it (its copied config keeps the relative noise folder) loads too
    _finetune(tmp_path / "ft", tmp_path / "ft2", manifest)
    assert (tmp_path / "ft2" / "init" / "encoder_init" / "config.yaml").read_text().count(
        "noise_dir: noise"
    ) == 1
    load_encoder_from_run(tmp_path / "ft2")


def test_the_parts_of_a_multi_run_load_without_their_noise_folder(tmp_path):
    cfg = load_config(
        "av_multi",
        [
            f"data.train={tmp_path / 'train.jsonl'}",
            "model.size=tiny",
            "objective.parts.av_hubert.noise_dir=gone",
        ],
    )
    save_resolved(cfg, tmp_path / "run")
    rebuilt = structure_config(tmp_path / "run")
    assert rebuilt.objective.parts.av_hubert.noise_dir is None
    assert rebuilt.objective.parts.av_hubert.num_classes == cfg.objective.parts.av_hubert.num_classes


def test_every_option_naming_a_noise_folder_is_declared_training_data():
    import inspect

    import mmssl.objectives  # noqa: F401

    for name in OBJECTIVES.names():
        takes = "noise_dir" in inspect.signature(OBJECTIVES.get(name)).parameters
        assert ("noise_dir" in OBJECTIVES.meta(name).get("train_data", ())) == takes, name


def test_a_missing_start_run_is_named_before_training(synth_tiny, tmp_path, capsys):
    code = main(
        [
            "finetune-asr",
            "--init",
            str(tmp_path / "nowhere"),
            f"data.train={synth_tiny / 'av' / 'train.jsonl'}",
            f"train.out_dir={tmp_path / 'ft'}",
            "train.device=cpu",
        ]
    )
    assert code == 2 and "nowhere" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name, runs, files, own",
    [
        ("ctc", ("encoder_init",), (), ("units_file",)),
        ("speech_image", ("speech_init",), ("clip_pretrained",), ()),
    ],
)
def test_builders_declare_the_options_that_name_start_points(name, runs, files, own):
    import inspect

    import mmssl.objectives  # noqa: F401

    meta = OBJECTIVES.meta(name)
    assert tuple(meta.get("init_runs", ())) == runs and tuple(meta.get("init_files", ())) == files
    assert tuple(meta.get("run_files", ())) == own
    params = inspect.signature(OBJECTIVES.get(name)).parameters
    assert all(key in params for key in (*runs, *files, *own))


def test_weights_that_do_not_fit_the_config_are_named(synth_tiny, tmp_path):
    from omegaconf import OmegaConf

    from mmssl.errors import DataError
    from mmssl.runs import load_objective_from_run

    _, step = save_tiny_run(tmp_path / "pre", "hubert", synth_tiny / "av" / "train.jsonl")
    cfg = OmegaConf.load(tmp_path / "pre" / "config.yaml")
    cfg.objective.num_classes = 5  # the saved label embeddings have 3 rows
    OmegaConf.save(cfg, tmp_path / "pre" / "config.yaml")
    with pytest.raises(DataError, match="model.safetensors: weights do not fit .*config.yaml"):
        load_objective_from_run(step)


def test_tied_weights_are_saved(tmp_path):
    w = torch.randn(3, 2)
    save_weights({"a": w, "b": w}, tmp_path / "m.safetensors")
    loaded = load_weights(tmp_path / "m.safetensors")
    assert torch.equal(loaded["a"], w) and torch.equal(loaded["b"], w)


def test_objective_and_model_keys_take_only_the_types_their_builder_declares():
    from mmssl.config import load_config
    from mmssl.errors import ConfigError
    from mmssl.runs import check_options

    base = ["data.train=a.jsonl", "model.size=tiny"]
    for override, named in [
        ("objective.mask_prob=abc", "objective.mask_prob must be a number, got 'abc'"),
        ("objective.mask_span=2.5", "objective.mask_span must be an integer, got 2.5"),
        ("objective.final_dim=wide", r"objective.final_dim must be an integer \(or null\)"),
        ("model.encoder=[1]", r"model.encoder must be a dict \(or null\)"),
    ]:
        with pytest.raises(ConfigError, match=named):
            check_options(load_config("wav2vec2", [*base, override]))
    for fine in ("objective.mask_prob=1", "objective.final_dim=null", "model.encoder={num_layers: 1}"):
        check_options(load_config("wav2vec2", [*base, fine]))


def test_a_run_records_the_checkpoint_it_starts_from_and_a_resume_keeps_it(tmp_path):
    from omegaconf import OmegaConf

    import mmssl.objectives  # noqa: F401  (registers speech_image and what it starts from)
    from mmssl.config import CONFIG_FILE
    from mmssl.runs import CHECKPOINTS, LATEST, MODEL_FILE, STATE_FILE, pin_inits

    source = tmp_path / "asr"

    def checkpoint(step):
        folder = source / CHECKPOINTS / f"step_{step:08d}"
        folder.mkdir(parents=True)
        for name in (MODEL_FILE, STATE_FILE):
            (folder / name).write_bytes(b"")
        (source / CHECKPOINTS / LATEST).write_text(folder.name)
        return str(folder.resolve())

    first = checkpoint(2)
    out = tmp_path / "retrieval"
    cfg = OmegaConf.create(
        {"objective": {"name": "speech_image", "speech_init": str(source)}, "train": {"out_dir": str(out)}}
    )
    assert pin_inits(cfg.copy(), resumed=False).objective.speech_init == first
    out.mkdir()
    OmegaConf.save(pin_inits(cfg.copy(), resumed=False), out / CONFIG_FILE)
    second = checkpoint(4)  # the source trains on
    # a fresh start takes the newest; a resumed run keeps the one it started from
    assert pin_inits(cfg.copy(), resumed=False).objective.speech_init == second
    assert pin_inits(cfg.copy(), resumed=True).objective.speech_init == first
    # unset, or a path without a checkpoint, is left as it is
    for value in (None, str(tmp_path / "missing")):
        cfg.objective.speech_init = value
        assert pin_inits(cfg.copy(), resumed=False).objective.speech_init == value
