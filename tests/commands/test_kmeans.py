import json
import re
import wave

import torch

from mmssl.cli import main
from mmssl.data.importers import kmeans_info
from mmssl.data.io import load_audio
from mmssl.nn.fbank import mfcc
from mmssl.nn.kmeans import nearest
from mmssl.testing import save_tiny_run

TONES = [(200, 2400), (450, 3200), (700, 1600)]  # (Hz, samples) segments: three "phones"


def _write_wav(path, samples):
    pcm = (samples.clamp(-1, 1) * 32767).short().numpy().tobytes()
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm)


def _corpus(tmp_path, count=6):
    """Utterances made of tone segments, with phone alignments as the built-in corpus writes them."""
    g = torch.Generator().manual_seed(0)
    (tmp_path / "wav").mkdir()
    (tmp_path / "align").mkdir()
    lines = []
    for i in range(count):
        pieces, phonemes, start = [], [], 0
        for j in range(4):
            hz, n = TONES[(i + j) % 3]
            t = torch.arange(n) / 16000
            pieces.append(0.5 * torch.sin(2 * torch.pi * hz * t) + 0.01 * torch.randn(n, generator=g))
            phonemes.append([f"p{hz}", start, start + n])
            start += n
        _write_wav(tmp_path / "wav" / f"u{i}.wav", torch.cat(pieces))
        doc = {"sample_rate": 16000, "phonemes": phonemes, "words": []}
        (tmp_path / "align" / f"u{i}.json").write_text(json.dumps(doc))
        lines.append(json.dumps({"id": f"u{i}", "audio": f"wav/u{i}.wav", "align": f"align/u{i}.json"}))
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def _km_lines(path):
    return [[int(v) for v in line.split()] for line in path.read_text().splitlines()]


def test_mfcc_labels_one_line_per_record_nearest_centroid(tmp_path, capsys):
    manifest = _corpus(tmp_path)
    out = tmp_path / "km"
    code = main(
        [
            "kmeans",
            "--manifest",
            str(manifest),
            "--features",
            "mfcc",
            "--k",
            "3",
            "--out",
            str(out),
            "--fit-fraction",
            "0.5",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    labels = _km_lines(out / "train.km")
    state = torch.load(out / "kmeans.pt", weights_only=True)
    assert state["centroids"].shape == (3, 39) and state["label_rate"] == 100.0
    assert kmeans_info(out) == {"k": 3, "label_rate": 100.0}
    assert len(labels) == 6
    for i, line in enumerate(labels):
        feats = mfcc(load_audio(tmp_path / "wav" / f"u{i}.wav"))
        assert len(line) == feats.shape[0]
        assert line == nearest(feats, state["centroids"])[0].tolist()
    quality = json.loads((out / "quality.json").read_text())
    # three well separated tones: clusters follow the phones
    assert quality["phone_purity"] > 0.9 and quality["pnmi"] > 0.7
    assert "cluster quality" in capsys.readouterr().out


def test_checkpoint_layer_labels_at_the_encoder_rate(tmp_path):
    manifest = _corpus(tmp_path, count=3)
    objective, step = save_tiny_run(tmp_path / "run", "hubert", manifest)
    out = tmp_path / "km"
    code = main(
        [
            "kmeans",
            "--manifest",
            str(manifest),
            "--checkpoint",
            str(step / "model.safetensors"),
            "--layer",
            "1",
            "--k",
            "2",
            "--out",
            str(out),
            "--fit-fraction",
            "1.0",
        ]
    )
    assert code == 0
    labels = _km_lines(out / "train.km")
    encoder = objective.encoder.eval()
    with torch.no_grad():
        for i, line in enumerate(labels):
            wav = load_audio(tmp_path / "wav" / f"u{i}.wav")
            feats = encoder.extract(wav[None], torch.tensor([wav.shape[0]]))
            assert len(line) == int(feats.lengths[0])  # 50 Hz frames
    assert torch.load(out / "kmeans.pt", weights_only=True)["label_rate"] == 50.0


def test_several_manifests_share_the_clusters_fitted_on_the_first(tmp_path):
    manifest = _corpus(tmp_path, count=4)
    records = manifest.read_text().splitlines()
    train, valid = tmp_path / "train.jsonl", tmp_path / "valid.jsonl"
    train.write_text("\n".join(records[:3]) + "\n")
    valid.write_text(records[3] + "\n")
    out = tmp_path / "km"
    code = main(
        [
            "kmeans",
            "--manifest",
            str(train),
            str(valid),
            "--features",
            "mfcc",
            "--k",
            "3",
            "--out",
            str(out),
            "--fit-fraction",
            "1.0",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    state = torch.load(out / "kmeans.pt", weights_only=True)
    (line,) = _km_lines(out / "valid.km")
    assert len(_km_lines(out / "train.km")) == 3
    assert line == nearest(mfcc(load_audio(tmp_path / "wav" / "u3.wav")), state["centroids"])[0].tolist()
    quality = json.loads((out / "quality.json").read_text())
    assert set(quality["by_manifest"]) == {"train", "valid"}
    assert quality["pnmi"] == quality["by_manifest"]["train"]["pnmi"]
    code = main(
        [
            "kmeans",
            "--manifest",
            str(train),
            str(tmp_path / "x" / "train.jsonl"),
            "--features",
            "mfcc",
            "--k",
            "3",
            "--out",
            str(out),
        ]
    )
    assert code == 2


def test_bad_input_is_reported_by_name(tmp_path, capsys):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "a", "audio": "missing.wav"}) + "\n")
    code = main(
        [
            "kmeans",
            "--manifest",
            str(manifest),
            "--features",
            "mfcc",
            "--k",
            "2",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2 and "missing.wav" in capsys.readouterr().err
    code = main(
        [
            "kmeans",
            "--manifest",
            str(manifest),
            "--checkpoint",
            str(tmp_path),
            "--k",
            "2",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2 and "--layer" in capsys.readouterr().err


def test_audio_visual_checkpoint_gives_25hz_labels(tmp_path):
    from mmssl.data.datasets import lip_frames
    from mmssl.data.io import load_video
    from mmssl.encoders.av import av_features
    from tests.data.media import moving_frames, tone, write_av

    lines = []
    for i, frames in enumerate((20, 13)):
        write_av(tmp_path / f"v{i}.mp4", moving_frames(frames), tone(frames * 640, freq=300 + 100 * i))
        lines.append(json.dumps({"id": f"v{i}", "audio": f"v{i}.mp4", "video": f"v{i}.mp4"}))
    manifest = tmp_path / "av.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    objective, step = save_tiny_run(tmp_path / "run", "av_hubert", manifest)
    out = tmp_path / "km"
    code = main(
        [
            "kmeans",
            "--manifest",
            str(manifest),
            "--checkpoint",
            str(step),
            "--layer",
            "1",
            "--k",
            "2",
            "--out",
            str(out),
            "--fit-fraction",
            "1.0",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    labels = _km_lines(out / "av.km")
    state = torch.load(out / "kmeans.pt", weights_only=True)
    assert state["label_rate"] == 25.0
    encoder = objective.encoder.eval()
    for i, line in enumerate(labels):
        video = lip_frames(load_video(tmp_path / f"v{i}.mp4"))
        audio = load_audio(tmp_path / f"v{i}.mp4")
        batch = {
            "audio": audio[None],
            "audio_lens": torch.tensor([audio.shape[0]]),
            "video": video[None],
            "video_lens": torch.tensor([video.shape[0]]),
        }
        feats, lengths = av_features(encoder, batch, 1)
        assert len(line) == int(lengths[0]) == video.shape[0]  # one label per 25 fps frame
        assert line == nearest(feats[0, : int(lengths[0])], state["centroids"])[0].tolist()


def test_fit_subset_grows_to_50_frames_per_cluster_capped_by_the_manifest():
    from mmssl.commands.kmeans import MIN_FRAMES_PER_CLUSTER, fit_kmeans

    assert MIN_FRAMES_PER_CLUSTER == 50
    g = torch.Generator().manual_seed(0)
    records = [{"id": i, "x": torch.randn(10, 2, generator=g)} for i in range(100)]  # 10 frames each
    read = []

    def feature_fn(record):
        read.append(record["id"])
        return record["x"]

    # 10% would be 10 records = 100 frames; k=4 needs 200 frames: 20 records
    km, cache = fit_kmeans(records, feature_fn, 4, 0.1, 0, 5, 1)
    assert len(cache) == len(read) == 20 and km.centroids.shape == (4, 2)
    # a larger fraction is kept as asked
    _, cache = fit_kmeans(records, lambda r: r["x"], 4, 0.5, 0, 5, 1)
    assert len(cache) == 50
    # a manifest too small for 50 frames per cluster: every record is taken, the fit still runs
    _, cache = fit_kmeans(records[:15], lambda r: r["x"], 4, 0.1, 0, 5, 1)
    assert len(cache) == 15


def test_batch_size_fits_with_minibatch_kmeans(tmp_path):
    manifest = _corpus(tmp_path)
    out = tmp_path / "km"
    code = main(
        [
            "kmeans",
            "--manifest",
            str(manifest),
            "--features",
            "mfcc",
            "--k",
            "3",
            "--out",
            str(out),
            "--fit-fraction",
            "1.0",
            "--device",
            "cpu",
            "--batch-size",
            "64",
            "--max-iter",
            "10",
        ]
    )
    assert code == 0
    state = torch.load(out / "kmeans.pt", weights_only=True)
    assert state["centroids"].shape == (3, 39)
    assert json.loads((out / "quality.json").read_text())["phone_purity"] > 0.9
    assert (
        main(
            [
                "kmeans",
                "--manifest",
                str(manifest),
                "--features",
                "mfcc",
                "--k",
                "3",
                "--out",
                str(out),
                "--batch-size",
                "0",
                "--device",
                "cpu",
            ]
        )
        == 2
    )


def _kmeans(manifests, out, *extra):
    args = ["kmeans", "--manifest", *map(str, manifests), "--features", "mfcc", "--out", str(out)]
    return main([*args, "--device", "cpu", *extra])


def test_the_memory_guard_prints_the_fit_and_refuses_naming_fit_fraction(tmp_path, capsys):
    manifest = _corpus(tmp_path)
    out = tmp_path / "km"
    assert _kmeans([manifest], out, "--k", "3", "--fit-fraction", "1.0") == 0
    printed = capsys.readouterr().out
    # no audio_samples in these records: 6 x the first record's frames
    assert re.search(r"kmeans: the fit holds \d+ frames x 39 dims: 0.\d\d GiB on cpu", printed)
    assert "GiB available" in printed
    code = _kmeans(
        [manifest], tmp_path / "small", "--k", "3", "--fit-fraction", "1.0", "--max-memory", "0.01"
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--fit-fraction" in err and "0.01 GiB" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "small").exists()  # nothing written, not even an empty folder


def test_memory_plan_counts_frames_from_audio_samples():
    from mmssl.commands.kmeans import fit_bytes, planned_frames

    records = [{"audio_samples": 16_000}, {"audio_samples": 32_000}, {}]
    # records in order 2, 0, 1; one wanted, 100 frames needed: the last one is never reached
    assert planned_frames(records, [2, 0, 1], 1, 100, 100.0, 7) == (2, 107)
    assert planned_frames(records, [0, 1, 2], 3, 0, 50.0, 7) == (3, 157)
    # 10^7 frames of a base model's 768 dims do not fit in 24 GiB; a 10% sample does
    assert fit_bytes(10**7, 768, 500) > 24 << 30 > fit_bytes(10**6, 768, 500)


def test_an_existing_labels_folder_is_replaced_only_with_overwrite(tmp_path, capsys):
    manifest = _corpus(tmp_path, count=4)
    records = manifest.read_text().splitlines()
    train, valid = tmp_path / "train.jsonl", tmp_path / "valid.jsonl"
    train.write_text("\n".join(records[:3]) + "\n")
    valid.write_text(records[3] + "\n")
    out = tmp_path / "km"
    assert _kmeans([train, valid], out, "--k", "3", "--fit-fraction", "1.0") == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(before) == {"train.km", "valid.km", "kmeans.pt", "labels.json", "quality.json"}
    recorded = json.loads((out / "labels.json").read_text())
    assert (
        recorded["k"] == 3
        and recorded["features"] == "mfcc"
        and set(recorded["manifests"]) == {"train", "valid"}
    )
    assert recorded["manifests"]["valid"]["records"] == 1
    assert recorded["clustering"] == torch.load(out / "kmeans.pt", weights_only=True)["clustering"]
    # another k into the same folder: refused, nothing touched (issue 16, item 3)
    assert _kmeans([train], out, "--k", "2", "--fit-fraction", "1.0") == 2
    assert "--overwrite" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # told to: the folder is replaced whole, so no valid.km of the old clustering stays
    assert _kmeans([train], out, "--k", "2", "--fit-fraction", "1.0", "--overwrite") == 0
    assert sorted(p.name for p in out.iterdir()) == ["kmeans.pt", "labels.json", "quality.json", "train.km"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_shards_label_what_the_whole_run_labels_and_merge(tmp_path, capsys):
    manifest = _corpus(tmp_path, count=5)
    whole, fitted = tmp_path / "whole", tmp_path / "fitted"
    common = ("--k", "3", "--fit-fraction", "1.0", "--seed", "3")
    assert _kmeans([manifest], whole, *common) == 0
    assert _kmeans([manifest], tmp_path / "x", "--shard", "0/2") == 2  # nothing fitted there
    assert "--fit-only" in capsys.readouterr().err
    assert _kmeans([manifest], fitted, *common, "--fit-only") == 0
    assert sorted(p.name for p in fitted.iterdir()) == ["kmeans.pt", "labels.json"]
    assert json.loads((fitted / "labels.json").read_text())["manifests"] == {}
    assert _kmeans([manifest], fitted, "--shard", "1/2") == 0
    assert (fitted / "train.00001-of-00002.km").is_file() and not (fitted / "train.km").exists()
    assert "1 of 2 shards" in capsys.readouterr().out
    assert _kmeans([manifest], fitted, "--shard", "1/2") == 2  # done already: not without --overwrite
    assert _kmeans([manifest], fitted, "--shard", "0/2", "--k", "4") == 2  # not the fitted k
    assert _kmeans([manifest], fitted, "--shard", "0/2") == 0
    assert "merged 2 shards" in capsys.readouterr().out
    assert sorted(p.name for p in fitted.iterdir()) == ["kmeans.pt", "labels.json", "train.km"]
    # the same seed fits the same clustering: the merged labels are the whole run's, in manifest order
    assert (fitted / "train.km").read_text() == (whole / "train.km").read_text()
    recorded = json.loads((fitted / "labels.json").read_text())
    assert (
        recorded["manifests"]["train"]
        == json.loads((whole / "labels.json").read_text())["manifests"]["train"]
    )
    from mmssl.data.datasets import ManifestDataset

    assert len(ManifestDataset(manifest, labels=fitted).labels) == 5  # the labels folder reads as any other
