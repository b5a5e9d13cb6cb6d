"""``--resume`` given something the run cannot take: refused, naming the key, with the run folder
(its ``config.yaml`` above all) left as it was; a config that fails leaves no run folder."""

import shutil

import pytest
from torch import nn

from mmssl.cli import main
from mmssl.errors import ConfigError, DataError
from mmssl.runs import load_objective_from_run
from mmssl.train.pretrain import pretrain
from tests.train.test_pretrain import LOCAL, _cfg, _write_corpus
from tests.train.toy import ToyObjective, read_metrics


@LOCAL.register
def toy_deep(size: str = "base", depth: int = 1, dropout: float = 0.1) -> ToyObjective:
    """The toy objective with ``depth`` hidden layers: ``depth`` reshapes its weights."""
    objective = ToyObjective(dropout=dropout)
    for _ in range(depth - 1):
        objective.layers.append(nn.Linear(8, 8))
    return objective


def _trained(tmp_path):
    manifest = _write_corpus(tmp_path, n=6)
    run = pretrain(_cfg(tmp_path, manifest, "objective.name=toy_deep", "train.max_steps=2"), registry=LOCAL)
    return run, manifest


def test_a_refused_resume_leaves_the_run_and_its_config_as_they_were(tmp_path, capsys):
    run, manifest = _trained(tmp_path)
    before = (run / "config.yaml").read_bytes()
    refused = {
        "model.size=base": "model.size=base but the run .* has model.size=tiny",
        "train.max_steps=0": "train.max_steps",
        "objective.depth=3": r"does not fit .*changed objective.depth: unset -> 3; layers.1.weight",
        "objective.name=toy": "objective.name=toy but the run",
        f"data.train={tmp_path / 'other.jsonl'}": "a resumed run keeps its data.train",
    }
    (tmp_path / "other.jsonl").write_text(manifest.read_text().splitlines()[0] + "\n")
    for override, message in refused.items():
        cfg = _cfg(tmp_path, manifest, "objective.name=toy_deep", "train.max_steps=4", override)
        with pytest.raises(ConfigError, match=message):
            pretrain(cfg, resume=True, registry=LOCAL)
        assert (run / "config.yaml").read_bytes() == before, override
    assert [r["step"] for r in read_metrics(run)] == [1, 2]
    # a resume that changes only what a run may change continues it
    shutil.copy(manifest, tmp_path / "moved.jsonl")  # the same records elsewhere: the same data
    moved = f"data.train={tmp_path / 'moved.jsonl'}"
    pretrain(
        _cfg(tmp_path, manifest, "objective.name=toy_deep", "train.max_steps=4", moved),
        resume=True,
        registry=LOCAL,
    )
    assert "with changed settings: train.max_steps: 2 -> 4" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]
    assert "max_steps: 4" in (run / "config.yaml").read_text()


def test_a_config_that_fails_leaves_no_run_folder(tmp_path):
    manifest = _write_corpus(tmp_path, n=2)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    failing = {
        (manifest, "train.max_steps=0"): (ConfigError, "train.max_steps"),
        (manifest, "data.min_audio_seconds=100"): (DataError, "lasts between"),
        (empty, "train.max_steps=1"): (DataError, "empty.jsonl has no records"),  # not its durations
    }
    for (data, bad), (kind, message) in failing.items():
        with pytest.raises(kind, match=message):
            pretrain(_cfg(tmp_path, data, bad), registry=LOCAL)
        assert not (tmp_path / "run").exists(), bad


def test_resume_with_a_recipe_of_another_objective_is_refused(tmp_path, capsys):
    from mmssl.config import load_config, load_run_config, resolve, save_resolved

    out = f"train.out_dir={tmp_path / 'run'}"
    save_resolved(resolve(load_config("wav2vec2", ["data.train=a.jsonl", out])), tmp_path / "run")
    with pytest.raises(
        ConfigError, match="recipe hubert trains objective 'hubert' but the run .* 'wav2vec2'"
    ):
        load_run_config("hubert", [out], resume=True)
    assert load_run_config("wav2vec2", [out], resume=True).objective.name == "wav2vec2"


def test_the_cli_refuses_a_resume_in_another_model_size_and_the_run_still_loads(tmp_path, capsys):
    """Issue 16: ``--resume model.size=base`` of a tiny run used to fail with a traceback after
    rewriting config.yaml to base, so that the run no longer resumed or loaded."""
    manifest = _write_corpus(tmp_path, n=4)
    run = tmp_path / "R"
    common = ["data.num_workers=0", "train.progress=false", "train.device=cpu", "train.valid_every=0"]
    first = ["pretrain", "wav2vec2", "model.size=tiny", f"data.train={manifest}", f"train.out_dir={run}"]
    assert main([*first, "train.max_steps=1", "data.min_audio_seconds=0.1", *common]) == 0
    before = (run / "config.yaml").read_bytes()
    for again in (["model.size=base"], ["train.max_steps=0"]):
        capsys.readouterr()
        assert main(["pretrain", "wav2vec2", f"train.out_dir={run}", "--resume", *again]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and again[0].split("=")[0] in err
        assert (run / "config.yaml").read_bytes() == before
    load_objective_from_run(run, expect="wav2vec2")  # what `extract --checkpoint R` builds
