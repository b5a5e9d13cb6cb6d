import json

import pytest
import torch

from mmssl.cli import main
from mmssl.data.datasets import lip_frames
from mmssl.data.io import load_audio, load_video
from mmssl.data.manifest import read_manifest, write_manifest
from mmssl.encoders.av import av_features
from mmssl.errors import ConfigError
from mmssl.eval.extract import iter_features, load_features, parse_layers, read_index
from mmssl.testing import save_tiny_run


@pytest.fixture(scope="module")
def corpus(synth_tiny, tmp_path_factory):
    """Two records of the built-in corpus (audio + lip video) and a hubert and an av_hubert run."""
    folder = tmp_path_factory.mktemp("extract")
    manifest = write_manifest(folder / "two.jsonl", read_manifest(synth_tiny / "av" / "valid.jsonl")[:2])
    speech = save_tiny_run(folder / "hubert", "hubert", manifest)
    av = save_tiny_run(folder / "av", "av_hubert", manifest)
    return manifest, speech, av


def test_speech_features_equal_every_layer_of_the_encoder(corpus, tmp_path):
    manifest, (objective, step), _ = corpus
    out = tmp_path / "feats"
    assert (
        main(
            [
                "extract",
                "--checkpoint",
                str(step),
                "--manifest",
                str(manifest),
                "--layer",
                "all",
                "--out",
                str(out),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    encoder = objective.encoder
    top = len(encoder.transformer.layers)
    index = read_index(out)
    assert len(index) == 2 * (top + 1)
    for record in read_manifest(manifest):
        wave = load_audio(record["audio"])
        with torch.no_grad():
            feats = encoder.extract(wave[None], torch.tensor([wave.shape[0]]))
            layers = [feats.x] + encoder.contextualize(feats.x, feats.lengths).layers
        n = int(feats.lengths[0])
        for layer, expected in enumerate(layers):
            stored = load_features(out, layer)[record["id"]]
            assert stored.dtype == torch.float32 and stored.shape == (n, encoder.dim)
            torch.testing.assert_close(stored, expected[0, :n], atol=1e-5, rtol=1e-5)
            (line,) = [x for x in index if x["id"] == record["id"] and x["layer"] == layer]
            assert line["frames"] == n and line["frame_rate"] == 50.0 and line["dim"] == encoder.dim


def test_audio_visual_features_across_shards(corpus, tmp_path):
    manifest, _, (objective, step) = corpus
    out = tmp_path / "feats"
    # a shard limit of ~1 kB closes a shard after every record
    assert (
        main(
            [
                "extract",
                "--checkpoint",
                str(step / "model.safetensors"),
                "--manifest",
                str(manifest),
                "--layer",
                "2,1",
                "--out",
                str(out),
                "--shard-mb",
                "0.001",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    records = read_manifest(manifest)
    files = {line["file"] for line in read_index(out)}
    assert files == {
        f"layer_{layer:02d}/shard_{s:05d}.safetensors" for layer in (1, 2) for s in range(len(records))
    }
    got = dict(iter_features(out, 2))
    assert list(got) == [r["id"] for r in records]  # manifest order
    for record in records:
        audio, video = load_audio(record["audio"]), lip_frames(load_video(record["video"]))
        batch = {
            "audio": audio[None],
            "audio_lens": torch.tensor([audio.shape[0]]),
            "video": video[None],
            "video_lens": torch.tensor([video.shape[0]]),
        }
        expected, lengths = av_features(objective.encoder, batch, 2)
        assert got[record["id"]].shape[0] == int(lengths[0]) == video.shape[0]  # 25 Hz, one per video frame
        torch.testing.assert_close(got[record["id"]], expected[0, : int(lengths[0])], atol=1e-5, rtol=1e-5)


def test_float16_and_audio_only_modality(corpus, tmp_path):
    manifest, _, (objective, step) = corpus
    out = tmp_path / "feats"
    assert (
        main(
            [
                "extract",
                "--checkpoint",
                str(step),
                "--manifest",
                str(manifest),
                "--layer",
                "0",
                "--out",
                str(out),
                "--dtype",
                "float16",
                "--modalities",
                "audio",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    record = read_manifest(manifest)[0]
    audio = load_audio(record["audio"])
    expected, lengths = av_features(
        objective.encoder, {"audio": audio[None], "audio_lens": torch.tensor([audio.shape[0]])}, 0
    )
    stored = load_features(out, 0)[record["id"]]
    assert stored.dtype == torch.float16
    torch.testing.assert_close(stored.float(), expected[0, : int(lengths[0])], atol=2e-3, rtol=2e-3)


def test_parse_layers():
    assert parse_layers("all", 3) == [0, 1, 2, 3]
    assert parse_layers("3,1,1", 3) == [1, 3]
    for bad in ("4", "-1", "x", ""):
        with pytest.raises(ConfigError):
            parse_layers(bad, 3)


def test_bad_input_exits_2_with_a_clear_message(corpus, tmp_path, capsys):
    manifest, (_, step), _ = corpus
    out = str(tmp_path / "o")
    assert (
        main(
            [
                "extract",
                "--checkpoint",
                str(tmp_path / "nope"),
                "--manifest",
                str(manifest),
                "--layer",
                "1",
                "--out",
                out,
            ]
        )
        == 2
    )
    assert "nope: checkpoint not found" in capsys.readouterr().err
    assert (
        main(
            ["extract", "--checkpoint", str(step), "--manifest", str(manifest), "--layer", "7", "--out", out]
        )
        == 2
    )
    assert "--layer 7: the encoder has layers 1..2" in capsys.readouterr().err
    records = read_manifest(manifest)
    broken = write_manifest(
        tmp_path / "broken.jsonl", [records[0], {"id": "ghost", "audio": str(tmp_path / "ghost.wav")}]
    )
    args = [
        "extract",
        "--checkpoint",
        str(step),
        "--manifest",
        str(broken),
        "--layer",
        "1",
        "--out",
        out,
        "--device",
        "cpu",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "'ghost'" in err and "ghost.wav" in err
    assert main(args + ["--skip-bad"]) == 0
    summary = json.loads((tmp_path / "o" / "extract.json").read_text())
    assert summary["records"] == 1 and [s["id"] for s in summary["skipped"]] == ["ghost"]
    assert [line["id"] for line in read_index(out)] == [records[0]["id"]]


def test_modalities_asked_for_are_required(corpus, tmp_path, capsys):
    manifest, _, (objective, step) = corpus
    record = {k: v for k, v in read_manifest(manifest)[0].items() if k != "video"}
    no_video = write_manifest(tmp_path / "no_video.jsonl", [record])
    args = [
        "extract",
        "--checkpoint",
        str(step),
        "--manifest",
        str(no_video),
        "--layer",
        "1",
        "--out",
        str(tmp_path / "o"),
        "--device",
        "cpu",
    ]
    assert main(args + ["--modalities", "audio,video"]) == 2
    assert f"record {record['id']!r}: no 'video' path" in capsys.readouterr().err
    assert main(args) == 0  # by default an audio-visual encoder reads what the record has
    audio = load_audio(record["audio"])
    expected, lengths = av_features(
        objective.encoder, {"audio": audio[None], "audio_lens": torch.tensor([audio.shape[0]])}, 1
    )
    torch.testing.assert_close(
        load_features(tmp_path / "o", 1)[record["id"]], expected[0, : int(lengths[0])], atol=1e-5, rtol=1e-5
    )


def test_a_failed_extraction_leaves_no_folder_and_an_earlier_one_whole(corpus, tmp_path, capsys):
    manifest, (_, step), _ = corpus
    records = read_manifest(manifest)
    ghost = write_manifest(
        tmp_path / "g.jsonl", [records[0], {"id": "ghost", "audio": str(tmp_path / "g.wav")}]
    )
    out = tmp_path / "feats"
    args = ["extract", "--checkpoint", str(step), "--layer", "1", "--out", str(out), "--device", "cpu"]
    assert main([*args, "--manifest", str(ghost)]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.jsonl"]  # no folder, empty or hidden
    assert main([*args, "--manifest", str(manifest)]) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main([*args, "--manifest", str(ghost)]) == 2
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert len(load_features(out, 1)) == 2  # the earlier extraction still reads back whole
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    capsys.readouterr()
    assert main([*args[:-4], "--out", str(tmp_path / "mine"), "--manifest", str(manifest)]) == 2
    assert "not a folder this command wrote (no extract.json)" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_an_audio_visual_run_on_an_audio_only_manifest_says_so(corpus, tmp_path, capsys):
    manifest, _, (_, step) = corpus
    audio_only = [{k: v for k, v in r.items() if k != "video"} for r in read_manifest(manifest)]
    no_video = write_manifest(tmp_path / "no_video.jsonl", audio_only)
    out = tmp_path / "o"
    argv = [
        "extract",
        "--checkpoint",
        str(step),
        "--manifest",
        str(no_video),
        "--layer",
        "1",
        "--out",
        str(out),
    ]
    assert main([*argv, "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "warning: 2 of 2 records have no video path: the audio-visual encoder reads them without it" in err
    summary = json.loads((out / "extract.json").read_text())
    assert summary["modalities_read"] == {"audio": 2} and "no video path" in summary["warning"]
    assert main([*argv[:4], str(manifest), *argv[5:-1], str(tmp_path / "both"), "--device", "cpu"]) == 0
    assert "warning" not in capsys.readouterr().err
    summary = json.loads((tmp_path / "both" / "extract.json").read_text())
    assert summary["modalities_read"] == {"audio+video": 2} and "warning" not in summary
