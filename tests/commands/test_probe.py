import json

import pytest
from safetensors.torch import load_file

from mmssl.cli import main
from mmssl.data.manifest import read_manifest, write_manifest
from mmssl.testing import save_tiny_run


@pytest.fixture(scope="module")
def tiny_run(synth_tiny, tmp_path_factory):
    """An untrained tiny hubert run (its step folder) on the built-in corpus's training manifest."""
    folder = tmp_path_factory.mktemp("probe")
    _, step = save_tiny_run(folder / "hubert", "hubert", synth_tiny / "av" / "train.jsonl")
    return step


def _probe(task, step, manifest, *more):
    return main(
        ["probe", "--task", task, "--checkpoint", str(step), "--manifest", str(manifest)]
        + ["--steps", "20", "--batch-size", "4", "--device", "cpu", "--no-progress", *more]
    )


def test_phone_probe_end_to_end(synth_tiny, tiny_run, tmp_path, capsys):
    out = tmp_path / "phones"
    av = synth_tiny / "av"
    assert (
        _probe("phones", tiny_run, av / "train.jsonl", "--valid", str(av / "valid.jsonl"), "--out", str(out))
        == 0
    )
    doc = json.loads((out / "probe.json").read_text())
    assert doc["task"] == "phones" and doc["utterances"] == 4 and doc["train_utterances"] == 16
    assert doc["phones"] > 0 and doc["per"] >= 0.0  # insertions can take it above 1
    assert len(doc["layer_weights"]) == 3  # tiny hubert: 2 layers and their input
    assert sum(doc["layer_weights"]) == pytest.approx(1.0)
    assert doc["loss_last"] < doc["loss_first"]
    assert (out / "layer_weights.png").stat().st_size > 1000
    state = load_file(out / "probe.safetensors")
    assert state["layer_weights.logits"].shape == (3,)
    assert "PER" in capsys.readouterr().out
    # an existing --out is replaced only with --overwrite
    again = _probe(
        "phones", tiny_run, av / "train.jsonl", "--valid", str(av / "valid.jsonl"), "--out", str(out)
    )
    assert again == 2 and "--overwrite" in capsys.readouterr().err


def test_speaker_probe_holds_out_utterances_of_training_speakers(synth_tiny, tiny_run, tmp_path, capsys):
    out = tmp_path / "speaker"
    assert (
        _probe("speaker", tiny_run, synth_tiny / "av" / "train.jsonl", "--holdout", "0.5", "--out", str(out))
        == 0
    )
    doc = json.loads((out / "probe.json").read_text())
    train = read_manifest(synth_tiny / "av" / "train.jsonl")
    speakers = sorted({r["speaker"] for r in train})
    assert doc["classes"] == speakers
    assert doc["utterances"] == len(train) - doc["train_utterances"] >= 1
    assert 0.0 <= doc["accuracy"] <= 1.0
    # the tiny corpus has few speakers with two records: the score rests on a handful of records
    assert (
        doc["utterances"] < 20
        and f"leaves {doc['utterances']} record(s) to score on" in capsys.readouterr().out
    )


def _one_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_bad_input_is_one_line_naming_the_file_or_key(synth_tiny, tiny_run, tmp_path, capsys):
    av = synth_tiny / "av"
    # the corpus's splits keep speakers apart: closed-set identification has nothing to score
    assert (
        _probe(
            "speaker",
            tiny_run,
            av / "train.jsonl",
            "--valid",
            str(av / "valid.jsonl"),
            "--out",
            str(tmp_path / "o"),
        )
        == 2
    )
    assert "closed-set" in _one_line(capsys)
    no_align = write_manifest(
        tmp_path / "no_align.jsonl",
        [{k: v for k, v in r.items() if k != "align"} for r in read_manifest(av / "train.jsonl")[:2]],
    )
    assert _probe("phones", tiny_run, no_align, "--holdout", "0.5", "--out", str(tmp_path / "o")) == 2
    line = _one_line(capsys)
    assert "no_align.jsonl" in line and "'align'" in line
    assert (
        _probe(
            "phones",
            tmp_path / "missing_run",
            av / "train.jsonl",
            "--holdout",
            "0.5",
            "--out",
            str(tmp_path / "o"),
        )
        == 2
    )
    assert "missing_run" in _one_line(capsys)
    assert not (tmp_path / "o").exists()


def test_layers_option_weighs_only_the_layers_named(synth_tiny, tiny_run, tmp_path):
    out = tmp_path / "input_only"
    code = _probe(
        "phones",
        tiny_run,
        synth_tiny / "av" / "train.jsonl",
        "--holdout",
        "0.25",
        "--layers",
        "0",
        "--out",
        str(out),
    )
    assert code == 0
    doc = json.loads((out / "probe.json").read_text())
    assert doc["layers"] == [0] and doc["layer_weights"] == [1.0] and doc["best_layer"] == 0
    assert doc["utterances"] == 4 and doc["train_utterances"] == 12
    out = tmp_path / "two"
    assert (
        _probe(
            "phones",
            tiny_run,
            synth_tiny / "av" / "train.jsonl",
            "--holdout",
            "0.25",
            "--layers",
            "2,1",
            "--out",
            str(out),
        )
        == 0
    )
    assert json.loads((out / "probe.json").read_text())["layers"] == [1, 2]


def test_speaker_records_of_unseen_speakers_are_left_out_and_counted(synth_tiny, tiny_run, tmp_path):
    av = synth_tiny / "av"
    mixed = write_manifest(
        tmp_path / "mixed.jsonl",
        read_manifest(av / "train.jsonl")[:2] + read_manifest(av / "valid.jsonl")[:3],
    )
    out = tmp_path / "speaker"
    assert _probe("speaker", tiny_run, av / "train.jsonl", "--valid", str(mixed), "--out", str(out)) == 0
    doc = json.loads((out / "probe.json").read_text())
    assert doc["utterances"] == 2 and doc["skipped_unseen"] == 3
