"""``mmssl pretrain --init RUN`` (``train.init``): a new run that starts from another run's
weights, e.g. continued pretraining of a converted checkpoint."""

import pytest
import torch
import yaml

from mmssl.config import load_config
from mmssl.errors import DataError
from mmssl.runs import build_objective, load_init, load_weights, save_weights
from mmssl.train.build import build_trainer
from mmssl.train.distributed import DistEnv
from mmssl.train.pretrain import pretrain
from tests.train.test_pretrain import LOCAL, _cfg, _write_corpus
from tests.train.toy import read_metrics


def _differs(a: dict, b: dict) -> list[str]:
    return [k for k in a if not torch.equal(a[k], b[k])]


def test_a_new_run_starts_from_the_weights_of_another_and_resume_reads_its_own(tmp_path, capsys):
    manifest = _write_corpus(tmp_path)
    source = pretrain(_cfg(tmp_path, manifest, "train.max_steps=3"), registry=LOCAL)
    trained = load_weights(source)
    fresh = _cfg(tmp_path, manifest, "train.seed=5", f"train.out_dir={tmp_path / 'fresh'}")
    random_start = build_trainer(fresh, DistEnv(), torch.device("cpu"), registry=LOCAL).objective.state_dict()
    assert _differs(trained, random_start)  # another seed, other weights: the check below can fail

    started = _cfg(
        tmp_path,
        manifest,
        "train.seed=5",
        "train.max_steps=2",
        f"train.init={source}",
        f"train.out_dir={tmp_path / 'b'}",
    )
    objective = build_trainer(started, DistEnv(), torch.device("cpu"), registry=LOCAL).objective
    assert not _differs(trained, objective.state_dict())
    assert "starting from" in capsys.readouterr().out

    run = pretrain(started, registry=LOCAL, resume=False)  # fresh optimizer and step count
    assert [r["step"] for r in read_metrics(run)] == [1, 2]
    pinned = yaml.safe_load((run / "config.yaml").read_text())["train"]["init"]
    assert pinned == str((source / "checkpoints" / "step_00000003").resolve())
    # resumed, the run continues from its own checkpoint and keeps the start it recorded,
    # even when the source has moved on since
    pretrain(
        _cfg(tmp_path, manifest, "train.max_steps=5", f"train.out_dir={source}"), resume=True, registry=LOCAL
    )
    again = _cfg(tmp_path, manifest, "train.max_steps=4", f"train.init={source}", f"train.out_dir={run}")
    pretrain(again, resume=True, registry=LOCAL)
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["init"] == pinned


def test_weights_of_another_shape_are_refused_by_key_before_anything_is_written(tmp_path):
    manifest = _write_corpus(tmp_path, n=4)
    state = build_objective(_cfg(tmp_path, manifest), registry=LOCAL).state_dict()
    state["proj.weight"] = torch.zeros(3, 3)
    (tmp_path / "odd").mkdir()
    save_weights(state, tmp_path / "odd" / "model.safetensors")
    cfg = _cfg(tmp_path, manifest, f"train.init={tmp_path / 'odd'}")
    with pytest.raises(DataError, match=r"proj\.weight has shape \(3, 3\)"):
        pretrain(cfg, registry=LOCAL)
    assert not (tmp_path / "run").exists()
    with pytest.raises(DataError, match="no checkpoint here"):
        pretrain(_cfg(tmp_path, manifest, f"train.init={tmp_path / 'nowhere'}"), registry=LOCAL)


RECIPE = ["data.train=a.jsonl", "data.labels=x", "model.size=tiny"]


def test_the_encoder_must_fit_heads_are_taken_where_they_fit(tmp_path):
    """From a HuBERT run to one with another k: the encoder loads, the label embeddings and
    projection stay as built; from a CTC run: its head is not used; another size is refused."""
    file = tmp_path / "model.safetensors"
    torch.manual_seed(0)
    state = build_objective(load_config("hubert", [*RECIPE, "objective.num_classes=10"])).state_dict()
    save_weights(state, file)
    torch.manual_seed(1)
    other_k = build_objective(load_config("hubert", [*RECIPE, "objective.num_classes=20"]))
    before = {k: v.clone() for k, v in other_k.state_dict().items()}
    _, as_built, unused = load_init(other_k, str(file))
    after = other_k.state_dict()
    encoder = [k for k in after if k.startswith("encoder.")]
    assert encoder and all(torch.equal(after[k], state[k]) for k in encoder)
    assert as_built and not any(k.startswith("encoder.") for k in as_built)
    assert all(torch.equal(after[k], before[k]) for k in as_built)  # kept as built
    assert not unused

    ctc_recipe = [
        "data.train=a.jsonl",
        "objective.encoder_init=none",
        "model.size=tiny",
        "objective.units=char",
    ]
    save_weights(build_objective(load_config("ctc", ctc_recipe)).state_dict(), file)
    _, _, unused = load_init(build_objective(load_config("hubert", RECIPE)), str(file))
    assert unused and not any(k.startswith("encoder.") for k in unused)  # the CTC head

    wider = build_objective(load_config("hubert", [*RECIPE, "objective.encoder={ffn_dim: 48}"]))
    with pytest.raises(DataError, match=r"encoder\..* has shape"):
        load_init(wider, str(file))
