import json

import pytest
import torch
from PIL import Image

from mmssl.cli import main
from mmssl.data.datasets import lip_frames
from mmssl.data.io import load_audio, load_video
from mmssl.data.manifest import read_manifest, write_manifest
from mmssl.encoders.av import av_features
from mmssl.errors import ConfigError
from mmssl.eval.layers import collect, pool_frames, rate_factors
from mmssl.eval.probes import cca_similarity, numerical_rank
from mmssl.testing import save_tiny_run


def sharpen(objective):
    """Larger transformer weights, so that its layers are far from linear maps of each other."""
    for name, p in objective.encoder.transformer.layers.named_parameters():
        if name.endswith("weight") and p.dim() == 2:
            torch.nn.init.normal_(p, std=2.0 / p.shape[1] ** 0.5)


@pytest.fixture(scope="module")
def corpus(synth_tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("layers")
    manifest = write_manifest(folder / "m.jsonl", read_manifest(synth_tiny / "av" / "valid.jsonl")[:3])
    return (
        manifest,
        save_tiny_run(folder / "hubert", "hubert", manifest, adjust=sharpen),
        save_tiny_run(folder / "av", "av_hubert", manifest),
    )


def _layers_cli(*args):
    return main(["layers", *map(str, args), "--device", "cpu"])


def test_a_run_against_itself_is_one_on_the_diagonal(corpus, tmp_path, capsys):
    manifest, (objective, step), _ = corpus
    top = len(objective.encoder.transformer.layers)
    for method in ("cca", "pwcca"):
        out = tmp_path / method
        assert (
            _layers_cli(
                "--checkpoint",
                step,
                "--against",
                step.parent.parent / "checkpoints" / step.name,
                "--manifest",
                manifest,
                "--method",
                method,
                "--out",
                out,
            )
            == 0
        )
        doc = json.loads((out / "layers.json").read_text())
        values = torch.tensor(doc["values"])
        assert values.shape == (top, top) and doc["rows"] == doc["columns"] == [
            str(i) for i in range(1, top + 1)
        ]
        assert torch.all(values.diagonal() > 0.999)
        assert values[0, 1] < 0.99 and values[1, 0] < 0.99  # different layers are not one linear map apart
        table = (out / "layers.md").read_text()
        assert (
            sum(line.startswith("| ") and not line.startswith("| layer") for line in table.splitlines())
            == top
        )
        assert table.split("\n\n", 1)[1].strip() in capsys.readouterr().out
        with Image.open(out / "layers.png") as img:
            assert img.format == "PNG"


def test_inputs_scores_equal_cca_on_the_valid_frames(corpus, tmp_path):
    manifest, (objective, step), _ = corpus
    out = tmp_path / "inputs"
    assert (
        _layers_cli(
            "--checkpoint",
            step,
            "--manifest",
            manifest,
            "--max-records",
            2,
            "--method",
            "svcca",
            "--out",
            out,
        )
        == 0
    )
    doc = json.loads((out / "layers.json").read_text())
    assert doc["columns"] == ["conv", "input"] and doc["records"] == 2
    encoder = objective.encoder
    raw, layers = [], [[] for _ in encoder.transformer.layers]
    for record in read_manifest(manifest)[:2]:
        wave = load_audio(record["audio"])
        with torch.no_grad():
            feats = encoder.extract(wave[None], torch.tensor([wave.shape[0]]))
            outs = encoder.contextualize(feats.x, feats.lengths).layers
        n = int(feats.lengths[0])
        raw.append(feats.raw[0, :n])
        for store, layer in zip(layers, outs):
            store.append(layer[0, :n])
    assert doc["frames"] == sum(x.shape[0] for x in raw)
    for i, store in enumerate(layers):
        expected = cca_similarity(torch.cat(store), torch.cat(raw), "svcca")
        assert doc["values"][i][0] == pytest.approx(expected, abs=1e-6)


def test_speech_against_audio_visual_pairs_50hz_with_25hz_frames(corpus, tmp_path):
    manifest, (speech, speech_step), (av, av_step) = corpus
    out = tmp_path / "cross"
    assert (
        _layers_cli("--checkpoint", speech_step, "--against", av_step, "--manifest", manifest, "--out", out)
        == 0
    )
    doc = json.loads((out / "layers.json").read_text())
    assert len(doc["rows"]) == 2 and doc["columns"] == ["1", "2"]
    frames = 0
    for record in read_manifest(manifest):
        audio, video = load_audio(record["audio"]), lip_frames(load_video(record["video"]))
        batch = {
            "audio": audio[None],
            "audio_lens": torch.tensor([audio.shape[0]]),
            "video": video[None],
            "video_lens": torch.tensor([video.shape[0]]),
        }
        av_frames = int(av_features(av.encoder, batch, 1)[1][0])
        speech_frames = int(speech.encoder.frame_lengths(torch.tensor(audio.shape[0])))
        frames += min(speech_frames // 2, av_frames)  # pairs of 50 Hz frames meet one 25 Hz frame
    assert doc["frames"] == frames
    assert all(0.0 <= v <= 1.0 for row in doc["values"] for v in row)


def test_an_audio_visual_encoder_against_its_inputs_on_the_same_frames(corpus):
    manifest, _, (av, _) = corpus
    records = read_manifest(manifest)[:2]
    layers, refs = collect(av.encoder, records, torch.device("cpu"))
    assert sorted(refs) == ["fbank", "fused", "lips"]
    frames = [int(av_features(av.encoder, _batch(r), 0)[1][0]) for r in records]
    assert all(x.shape[0] == sum(frames) for x in [*layers, *refs.values()])
    assert refs["fbank"].shape[1] == 104  # 26 filterbanks x 4
    # the lip features of the second record are its valid frames of video_features
    batch = _batch(records[1])
    with torch.no_grad():
        v, _ = av.encoder.video_features(batch["video"], batch["video_lens"])
    torch.testing.assert_close(refs["lips"][frames[0] :], v[0, : frames[1]])


def _batch(record):
    audio, video = load_audio(record["audio"]), lip_frames(load_video(record["video"]))
    return {
        "audio": audio[None],
        "audio_lens": torch.tensor([audio.shape[0]]),
        "video": video[None],
        "video_lens": torch.tensor([video.shape[0]]),
    }


def test_pool_frames_and_rate_factors():
    x = torch.arange(10.0).view(5, 2)
    assert pool_frames(x, 2).tolist() == [[1.0, 2.0], [5.0, 6.0]]  # means of frames (0, 1) and (2, 3)
    assert (
        rate_factors(50.0, 25.0) == (2, 1)
        and rate_factors(25.0, 50.0) == (1, 2)
        and rate_factors(50.0, 50.0) == (1, 1)
    )
    with pytest.raises(ConfigError, match="integer multiples"):
        rate_factors(50.0, 30.0)


def test_bad_input_exits_2_with_a_clear_message(corpus, tmp_path, capsys):
    manifest, (_, step), _ = corpus
    assert (
        _layers_cli("--checkpoint", tmp_path / "nope", "--manifest", manifest, "--out", tmp_path / "o") == 2
    )
    assert "nope: checkpoint not found" in capsys.readouterr().err
    assert (
        _layers_cli("--checkpoint", step, "--manifest", tmp_path / "none.jsonl", "--out", tmp_path / "o") == 2
    )
    assert "manifest not found" in capsys.readouterr().err
    assert (
        _layers_cli("--checkpoint", step, "--manifest", manifest, "--max-records", 0, "--out", tmp_path / "o")
        == 2
    )
    assert "--max-records" in capsys.readouterr().err
    # argparse's refusal of two exclusive options is one line and exit 2, like every other error
    code = _layers_cli(
        "--checkpoint",
        step,
        "--against",
        step,
        "--against-inputs",
        "--manifest",
        manifest,
        "--out",
        tmp_path / "o",
    )
    err = capsys.readouterr().err
    assert code == 2 and "not allowed with argument --against" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_mean_cca_ignores_a_direction_a_view_does_not_vary_in():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(800, 8, generator=g)
    normed = torch.nn.functional.layer_norm(x, (8,))  # every frame has zero channel mean: rank 7
    assert numerical_rank(normed - normed.mean(0)) == 7 and numerical_rank(x - x.mean(0)) == 8
    # seven canonical correlations of 1; the eighth pair would be a (zero-variance) 0
    assert cca_similarity(normed, normed, "cca") == pytest.approx(1.0, abs=1e-4)
    assert cca_similarity(normed, torch.randn(800, 8, generator=g), "cca") < 0.1


def test_an_audio_visual_run_on_an_audio_only_manifest_says_so(corpus, tmp_path, capsys):
    manifest, _, (_, step) = corpus
    records = read_manifest(manifest)
    audio_only = write_manifest(
        tmp_path / "a.jsonl", [{k: v for k, v in r.items() if k != "video"} for r in records]
    )
    assert _layers_cli("--checkpoint", step, "--manifest", audio_only, "--out", tmp_path / "o") == 0
    assert "warning: 3 of 3 records have no video path" in capsys.readouterr().err
    about = json.loads((tmp_path / "o" / "layers.json").read_text())
    assert about["modalities_read"] == {"audio": 3} and "no video path" in about["warning"]
    # some records with video, some without: their inputs differ (no lips), which is named
    mixed = write_manifest(tmp_path / "m.jsonl", [records[0], *read_manifest(audio_only)[1:]])
    assert _layers_cli("--checkpoint", step, "--manifest", mixed, "--out", tmp_path / "m") == 2
    err = capsys.readouterr().err
    assert "warning: 2 of 3 records have no video path" in err
    assert f"record {records[1]['id']!r} gives the references fbank, fused but the records before it" in err
