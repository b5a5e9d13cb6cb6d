import json
import math

import pytest
import torch

from mmssl.cli import main
from mmssl.data.io import load_audio
from mmssl.data.manifest import read_manifest, write_manifest
from mmssl.eval.awe import embed_segments, keep_segment, read_words, same_different
from mmssl.testing import save_tiny_run


@pytest.fixture(scope="module")
def corpus(synth_tiny, tmp_path_factory):
    """Eight records of the built-in corpus (audio, lip video, word alignments) and an untrained
    tiny hubert run and av_hubert run."""
    folder = tmp_path_factory.mktemp("awe")
    manifest = write_manifest(folder / "eight.jsonl", read_manifest(synth_tiny / "av" / "train.jsonl")[:8])
    speech = save_tiny_run(folder / "hubert", "hubert", manifest)
    av = save_tiny_run(folder / "av", "av_hubert", manifest)
    return manifest, speech, av


def test_speech_run_layers_and_mfcc_are_scored_as_by_hand(corpus, tmp_path, capsys):
    manifest, (objective, step), _ = corpus
    out = tmp_path / "awe"
    argv = ["awe", "--checkpoint", str(step), "--manifest", str(manifest), "--min-chars", "3"]
    assert main([*argv, "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    doc = json.loads((out / "awe.json").read_text())
    encoder = objective.encoder
    top = len(encoder.transformer.layers)
    assert doc["layers"] == list(range(top + 1)) and doc["frame_rate"] == 50.0
    assert set(doc["results"]) == {"mfcc", *map(str, range(top + 1))}
    assert (out / "awe.png").stat().st_size > 0 and "| MFCC |" in (out / "awe.md").read_text()
    assert "| layer 1 |" in printed

    # layer 1, mean pooled, from the encoder directly: frames at 50 Hz
    rows, words = [], []
    for record in read_manifest(manifest):
        kept = [s for s in read_words(record["align"], record["id"]) if keep_segment(s, 3, 0.0)]
        wave = load_audio(record["audio"])
        with torch.no_grad():
            feats = encoder.extract(wave[None], torch.tensor([wave.shape[0]]))
            layer1 = encoder.contextualize(feats.x, feats.lengths).layers[0][0, : int(feats.lengths[0])]
        rows.append(embed_segments(layer1, kept, 50.0, "mean"))
        words += [s.word for s in kept]
    expected = same_different(torch.cat(rows), words)
    got = doc["results"]["1"]
    assert got["segments"] == expected["segments"] == len(words) and got["same_pairs"] > 0
    assert math.isclose(got["ap"], expected["ap"], rel_tol=1e-4)
    assert 0.0 < doc["results"]["mfcc"]["ap"] <= 1.0
    assert math.isclose(doc["chance"], expected["same_pairs"] / expected["pairs"])

    # an output folder that holds anything is replaced only with --overwrite
    assert main([*argv, "--out", str(out), "--device", "cpu"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*argv, "--layer", "2", "--out", str(out), "--overwrite", "--device", "cpu"]) == 0
    assert set(json.loads((out / "awe.json").read_text())["results"]) == {"mfcc", "2"}


def test_audio_visual_run_reads_frames_at_25_hz_and_downsamples(corpus, tmp_path):
    manifest, _, (objective, step) = corpus
    out = tmp_path / "awe"
    argv = ["awe", "--checkpoint", str(step), "--manifest", str(manifest), "--layer", "1", "--no-mfcc"]
    assert main([*argv, "--pool", "downsample", "--frames", "3", "--out", str(out), "--device", "cpu"]) == 0
    doc = json.loads((out / "awe.json").read_text())
    assert doc["frame_rate"] == 25.0 and doc["frames"] == 3 and set(doc["results"]) == {"1"}
    assert 0.0 < doc["results"]["1"]["ap"] <= 1.0


def test_a_segment_file_gives_the_same_words_as_the_alignments(corpus, tmp_path, capsys):
    manifest = corpus[0]
    lines = []
    for record in read_manifest(manifest):
        lines += [f"{s.record} {s.word} {s.start} {s.end}" for s in read_words(record["align"], record["id"])]
    segments = tmp_path / "segments.txt"
    segments.write_text("\n".join(lines) + "\n")
    base = ["awe", "--manifest", str(manifest), "--pool", "downsample"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    assert main([*base, "--segments", str(segments), "--out", str(tmp_path / "s")]) == 0
    a = json.loads((tmp_path / "a" / "awe.json").read_text())["results"]["mfcc"]
    s = json.loads((tmp_path / "s" / "awe.json").read_text())["results"]["mfcc"]
    assert a == s and a["segments"] > 0
    capsys.readouterr()

    segments.write_text("nobody purple 0.1 0.4\n")
    assert main([*base, "--segments", str(segments)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "segments.txt" in err[0] and "nobody" in err[0]


def test_records_without_alignments_or_words_are_refused_in_one_line(tmp_path, capsys):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "r0", "audio": "r0.wav"}) + "\n")
    assert main(["awe", "--manifest", str(manifest)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'r0'" in err[0] and "--segments" in err[0]
    assert main(["awe", "--manifest", str(manifest), "--no-mfcc"]) == 2
    assert "--checkpoint" in capsys.readouterr().err
