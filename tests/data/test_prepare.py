"""``mmssl data prepare`` on small fake copies of each corpus, written with PyAV in tmp_path."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import av
import numpy as np
import pytest

from mmssl.cli import main
from mmssl.data.check import check_manifest
from mmssl.data.io import load_audio
from mmssl.data.manifest import read_manifest
from mmssl.data.noise import NoiseBank
from mmssl.data.prepare import flickr8k, librispeech, lrs3, musan
from mmssl.errors import DataError
from tests.data.media import moving_frames, tone, write_av, write_image, write_wav

SR = 16000


def write_flac(path: Path, samples: int, freq: float = 300.0) -> None:
    """A mono 16 kHz flac of ``samples`` samples (a sine)."""
    data = np.round(tone(samples, SR, freq=freq)[0] * 32767).astype(np.int16)
    with av.open(str(path), "w", format="flac") as container:
        stream = container.add_stream("flac", rate=SR, layout="mono")
        stream.format = "s16"
        frame = av.AudioFrame.from_ndarray(data.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.pts = SR, 0
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def write_clip(path: Path, frames: int = 20) -> None:
    """A 25 fps mp4 (H.264 32x32 + AAC) lasting ``frames`` frames."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_av(path, moving_frames(frames, 32, 32), tone(frames * 640), video_codec="libx264")


def prepare(*args: str) -> int:
    return main(["data", "prepare", *args, "--workers", "1", "--quiet"])


def by_id(path: Path) -> dict[str, dict]:
    return {r["id"]: r for r in read_manifest(path)}


def assert_checks(path: Path) -> None:
    total, problems, _ = check_manifest(str(path), workers=1, progress=False)
    assert total > 0 and problems == []


# --- LibriSpeech ---------------------------------------------------------------------------------
@pytest.fixture
def libri(tmp_path):
    root = tmp_path / "LibriSpeech"
    lengths = {
        "dev-clean/84/121/84-121-0000": 4000,
        "dev-clean/84/121/84-121-0001": 6400,
        "dev-clean/84/122/84-122-0000": 5000,
        "test-clean/61/70/61-70-0000": 3000,
    }
    for name, n in lengths.items():
        path = root / f"{name}.flac"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_flac(path, n)
    (root / "dev-clean/84/121/84-121-0002.flac").write_bytes(np.random.default_rng(0).bytes(4000))  # corrupt
    (root / "dev-clean/84/121/84-121-0003.flac").write_bytes(
        (root / "dev-clean/84/121/84-121-0000.flac").read_bytes()
    )
    (root / "dev-clean/84/121/84-121.trans.txt").write_text(
        "84-121-0000 HE HOPED THERE WOULD BE STEW\n84-121-0001 STUFF IT INTO YOU\n"
        "84-121-0002 A CORRUPT ONE\n84-121-0009 NO AUDIO FOR THIS LINE\n"
    )
    (root / "dev-clean/84/122/84-122.trans.txt").write_text("84-122-0000 AFTER EARLY NIGHTFALL\n")
    (root / "test-clean/61/70/61-70.trans.txt").write_text("61-70-0000 YOU WILL BE FRANK WITH ME\n")
    return root, lengths


def test_librispeech_records_skips_and_summary(libri, tmp_path, capsys):
    root, lengths = libri
    out = tmp_path / "out"
    assert prepare("librispeech", "--root", str(root), "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert "| dev-clean | 3 | 0.00 | 3 |" in printed and "| test-clean | 1 | 0.00 | 0 |" in printed
    assert "1  no line in 84-121.trans.txt" in printed
    dev, test = by_id(out / "dev-clean.jsonl"), by_id(out / "test-clean.jsonl")
    assert list(dev) == ["84-121-0000", "84-121-0001", "84-122-0000"] and list(test) == ["61-70-0000"]
    assert dev["84-121-0001"]["transcript"] == "STUFF IT INTO YOU" and dev["84-122-0000"]["speaker"] == "84"
    for name, n in lengths.items():
        record = {**dev, **test}[Path(name).name]
        assert record["audio_samples"] == n and record["audio"] == str((root / f"{name}.flac").resolve())
    skipped = {
        s["id"]: s["reason"] for s in map(json.loads, (out / "skipped.jsonl").read_text().splitlines())
    }
    assert skipped["84-121-0003"] == "no line in 84-121.trans.txt"
    assert skipped["84-121-0009"] == "listed in the transcript file, no audio file"
    assert skipped["84-121-0002"] == "zero-length audio"  # FFmpeg's flac reader finds no frame in the noise
    summary = json.loads((out / "prepare.json").read_text())["splits"]
    assert summary["dev-clean"]["records"] == 3 and summary["dev-clean"]["skipped"] == 3
    assert summary["dev-clean"]["hours"] == pytest.approx((4000 + 6400 + 5000) / SR / 3600, abs=1e-4)
    assert summary["test-clean"] == {**summary["test-clean"], "records": 1, "skipped": 0}
    assert_checks(out / "dev-clean.jsonl")


def test_librispeech_parallel_limit_and_splits(libri, tmp_path):
    root, _ = libri
    one, two = tmp_path / "one", tmp_path / "two"
    assert prepare("librispeech", "--root", str(root), "--out", str(one)) == 0
    assert (
        main(
            [
                "data",
                "prepare",
                "librispeech",
                "--root",
                str(root),
                "--out",
                str(two),
                "--workers",
                "2",
                "--quiet",
            ]
        )
        == 0
    )
    assert (one / "dev-clean.jsonl").read_text() == (two / "dev-clean.jsonl").read_text()
    three = tmp_path / "three"
    assert (
        prepare(
            "librispeech", "--root", str(root), "--out", str(three), "--splits", "test-clean", "--limit", "1"
        )
        == 0
    )
    assert sorted(p.name for p in three.glob("*.jsonl")) == ["skipped.jsonl", "test-clean.jsonl"]
    assert (
        prepare("librispeech", "--root", str(root), "--out", str(three), "--splits", "train-clean-100") == 2
    )


def test_librispeech_missing_transcript_file_is_named(libri, tmp_path):
    root, _ = libri
    (root / "dev-clean/84/122/84-122.trans.txt").unlink()
    with pytest.raises(
        DataError, match=r"84-122\.trans\.txt: transcript file not found.*datasets/librispeech/README\.md"
    ):
        librispeech.collect(root)


@pytest.mark.parametrize("corpus", ["librispeech", "lrs3", "voxceleb2", "musan"])
def test_a_folder_without_the_layout_names_the_readme(corpus, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert prepare(corpus, "--root", str(tmp_path / "empty"), "--out", str(tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "empty") in err and f"datasets/{corpus}/README.md" in err
    assert not (tmp_path / "o").exists()


def test_option_of_another_corpus_is_refused(libri, tmp_path, capsys):
    root, _ = libri
    assert (
        prepare("librispeech", "--root", str(root), "--out", str(tmp_path / "o"), "--karpathy", "x.json") == 2
    )
    assert "--karpathy applies to spokencoco" in capsys.readouterr().err


# --- LRS3 ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lrs3_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("lrs3")
    clips = {f"trainval/talk{t}/0000{c}": 15 + c for t in range(2) for c in range(1, 4)}
    clips |= {"test/talkT/00001": 18, "pretrain/talkP/00001": 22}
    for key, frames in clips.items():
        write_clip(root / f"{key}.mp4", frames)
        (root / f"{key}.txt").write_text(
            f"Text:  WORDS OF {key.upper()}\nConf:  4\n\nWORD START END ASDSCORE\n"
        )
    write_clip(root / "trainval/talk1/00009.mp4", 10)  # no .txt
    return root, clips


def test_lrs3_splits_transcripts_and_counts(lrs3_root, tmp_path):
    root, clips = lrs3_root
    out = tmp_path / "out"
    assert prepare("lrs3", "--root", str(root), "--out", str(out), "--valid-size", "2") == 0
    parts = {s: by_id(out / f"{s}.jsonl") for s in ("pretrain", "train", "valid", "test")}
    assert set(parts["train"]) | set(parts["valid"]) == {k for k in clips if k.startswith("trainval/")}
    assert not set(parts["train"]) & set(parts["valid"]) and len(parts["valid"]) == 2
    assert list(parts["test"]) == ["test/talkT/00001"] and list(parts["pretrain"]) == ["pretrain/talkP/00001"]
    record = parts["train"].get("trainval/talk0/00002") or parts["valid"]["trainval/talk0/00002"]
    assert record["transcript"] == "WORDS OF TRAINVAL/TALK0/00002" and record["speaker"] == "talk0"
    assert record["video_frames"] == clips["trainval/talk0/00002"] and record["audio"] == record["video"]
    assert abs(record["audio_samples"] - 640 * record["video_frames"]) <= 640
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert [(s["id"], s["reason"]) for s in skipped] == [("trainval/talk1/00009", "no transcript file")]
    assert_checks(out / "train.jsonl")


def test_lrs3_valid_hold_out_is_deterministic(lrs3_root, tmp_path):
    root, _ = lrs3_root
    first = lrs3.collect(root, valid_size=2, seed=3)
    again = lrs3.collect(root, valid_size=2, seed=3)
    assert [r["id"] for r in first.splits["valid"]] == [r["id"] for r in again.splits["valid"]]
    ids = [f"trainval/t{i}/0000{i}" for i in range(50)]
    assert lrs3.hold_out(ids, 10, seed=0) == lrs3.hold_out(
        ids[::-1], 10, seed=0
    )  # listing order does not matter
    assert lrs3.hold_out(ids, 10, seed=0) != lrs3.hold_out(ids, 10, seed=1)
    listed = tmp_path / "valid.id"
    listed.write_text("trainval/talk1/00003\n")
    chosen = lrs3.collect(root, splits=["trainval"], valid_ids=listed)
    assert [r["id"] for r in chosen.splits["valid"]] == ["trainval/talk1/00003"] and list(chosen.splits) == [
        "train",
        "valid",
    ]
    listed.write_text("talk1/00003\n")  # not the file-id form
    with pytest.raises(DataError, match="valid.id: none of its 1 ids is a trainval clip"):
        lrs3.collect(root, splits=["trainval"], valid_ids=listed)


# --- VoxCeleb2 -----------------------------------------------------------------------------------
def test_voxceleb2_records_keep_ids_and_bad_files(tmp_path):
    root = tmp_path / "vox2"
    for key in (
        "dev/mp4/id001/ytA/00001",
        "dev/mp4/id001/ytA/00002",
        "dev/mp4/id002/ytB/00001",
        "test/mp4/id009/ytC/00001",
    ):
        write_clip(root / f"{key}.mp4", 12)
    write_av(
        root / "dev/mp4/id002/ytB/00002.mp4", moving_frames(12, 32, 32), None, video_codec="mpeg4"
    )  # no audio
    (root / "dev/mp4/id003/ytD").mkdir(parents=True)
    (root / "dev/mp4/id003/ytD/00001.mp4").write_bytes(b"\x00" * 500)  # corrupt
    out = tmp_path / "out"
    assert prepare("voxceleb2", "--root", str(root), "--out", str(out)) == 0
    dev = by_id(out / "dev.jsonl")
    assert list(dev) == ["id001/ytA/00001", "id001/ytA/00002", "id002/ytB/00001"]
    assert dev["id002/ytB/00001"]["speaker"] == "id002" and dev["id002/ytB/00001"]["video_frames"] == 12
    assert list(by_id(out / "test.jsonl")) == ["id009/ytC/00001"]
    reasons = {
        s["id"]: s["reason"] for s in map(json.loads, (out / "skipped.jsonl").read_text().splitlines())
    }
    assert reasons["id002/ytB/00002"] == "no audio stream" and reasons["id003/ytD/00001"].startswith(
        "cannot open"
    )
    assert_checks(out / "dev.jsonl")
    keep = tmp_path / "vox-en.id.gz"
    with gzip.open(keep, "wt") as f:
        f.write("dev/mp4/id001/ytA/00002\nid009/ytC/00001\n")
    kept = tmp_path / "kept"
    assert prepare("voxceleb2", "--root", str(root), "--out", str(kept), "--keep-ids", str(keep)) == 0
    assert list(by_id(kept / "dev.jsonl")) == ["id001/ytA/00002"] and list(by_id(kept / "test.jsonl")) == [
        "id009/ytC/00001"
    ]


# --- SpokenCOCO ----------------------------------------------------------------------------------
def _image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_image(path, np.random.default_rng(seed).integers(0, 256, (16, 24, 3), dtype=np.uint8))


@pytest.fixture
def coco(tmp_path):
    images, root = tmp_path / "coco", tmp_path / "coco" / "SpokenCOCO"
    doc = {}
    for split, folder, names in (("train", "train2014", ["A", "B"]), ("val", "val2014", ["C"])):
        data = []
        for name in names:
            image = f"{folder}/COCO_{folder}_{name}.png"
            _image(images / image, ord(name))
            captions = []
            for k in range(2):
                uttid = f"spk{k}-{name}{k}"
                wav = f"wavs/{split}/0/{uttid}.wav"
                if uttid != "spk1-B1":  # its wav is missing
                    (root / wav).parent.mkdir(parents=True, exist_ok=True)
                    write_wav(root / wav, tone(3000 + 100 * k))
                captions.append(
                    {"text": f"a photo {name} number {k} ", "speaker": f"spk{k}", "uttid": uttid, "wav": wav}
                )
            data.append({"image": image, "captions": captions})
        doc[split] = data
        (root / f"SpokenCOCO_{split}.json").write_text(json.dumps({"data": data}))
    return root, images


def test_spokencoco_json_splits(coco, tmp_path):
    root, _ = coco
    out = tmp_path / "out"
    assert prepare("spokencoco", "--root", str(root), "--out", str(out)) == 0
    train, valid = by_id(out / "train.jsonl"), by_id(out / "valid.jsonl")
    assert list(train) == ["spk0-A0", "spk1-A1", "spk0-B0"] and list(valid) == ["spk0-C0", "spk1-C1"]
    record = train["spk1-A1"]
    assert record["caption"] == record["transcript"] == "a photo A number 1"
    assert (
        record["group"] == "COCO_train2014_A"
        and record["speaker"] == "spk1"
        and record["audio_samples"] == 3100
    )
    assert record["image"] == str((root.parent / "train2014/COCO_train2014_A.png").resolve())
    reasons = {
        s["id"]: s["reason"] for s in map(json.loads, (out / "skipped.jsonl").read_text().splitlines())
    }
    assert reasons == {"spk1-B1": "missing file"}
    assert_checks(out / "valid.jsonl")


def test_spokencoco_karpathy_split(coco, tmp_path):
    root, images = coco
    karpathy = tmp_path / "dataset_coco.json"
    entries = [("train2014", "COCO_train2014_A.png", "restval"), ("val2014", "COCO_val2014_C.png", "test")]
    karpathy.write_text(
        json.dumps({"images": [{"filepath": p, "filename": f, "split": s} for p, f, s in entries]})
    )
    out = tmp_path / "out"
    assert (
        prepare(
            "spokencoco",
            "--root",
            str(root),
            "--out",
            str(out),
            "--images",
            str(images),
            "--karpathy",
            str(karpathy),
        )
        == 0
    )
    assert list(by_id(out / "train.jsonl")) == ["spk0-A0", "spk1-A1"]
    assert list(by_id(out / "test.jsonl")) == ["spk0-C0", "spk1-C1"]
    assert not (out / "valid.jsonl").exists()
    reasons = [json.loads(line)["reason"] for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert reasons == ["image not in the Karpathy split file"] * 2  # B's two captions


def test_spokencoco_missing_json_is_named(coco, tmp_path, capsys):
    root, _ = coco
    (root / "SpokenCOCO_val.json").unlink()
    assert prepare("spokencoco", "--root", str(root), "--out", str(tmp_path / "o")) == 2
    assert "SpokenCOCO_val.json: caption file not found" in capsys.readouterr().err


# --- Flickr 8k Audio -----------------------------------------------------------------------------
def test_flickr8k_records_and_splits(tmp_path):
    root, images = tmp_path / "flickr_audio", tmp_path / "Flicker8k_Dataset"
    names = {"img1": "train", "img2": "dev", "img3": "test", "img4": None}
    capt, token, spk = [], [], []
    for i, name in enumerate(names):
        _image(images / f"{name}.jpg", i)
        for n in range(2):
            wav = f"{name}_{n}.wav"
            (root / "wavs").mkdir(parents=True, exist_ok=True)
            write_wav(root / "wavs" / wav, tone(2000 + 10 * n))
            capt.append(f"{wav} {name}.jpg #{n}")
            token.append(f"{name}.jpg#{n}\tA caption of {name} , number {n} .")
            spk.append(f"{wav} {40 + n}")
    (root / "wav2capt.txt").write_text("\n".join(capt) + "\n")
    (root / "wav2spk.txt").write_text("\n".join(spk) + "\n")
    (root / "Flickr8k.token.txt").write_text("\n".join(token) + "\n")
    for split in ("train", "dev", "test"):
        listed = [f"{n}.jpg" for n, s in names.items() if s == split]
        (root / f"Flickr_8k.{split}Images.txt").write_text("\n".join(listed) + "\n")
    out = tmp_path / "out"
    assert prepare("flickr8k", "--root", str(root), "--out", str(out)) == 0
    train, valid, test = (by_id(out / f"{s}.jsonl") for s in ("train", "valid", "test"))
    assert (
        list(train) == ["img1_0", "img1_1"]
        and list(valid) == ["img2_0", "img2_1"]
        and list(test) == ["img3_0", "img3_1"]
    )
    record = valid["img2_1"]
    assert record["caption"] == "A caption of img2 , number 1 ." and record["group"] == "img2"
    assert record["speaker"] == "41" and record["audio_samples"] == 2010
    assert record["image"] == str((images / "img2.jpg").resolve())
    reasons = [json.loads(line)["reason"] for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert reasons == ["image in no split list"] * 2
    assert_checks(out / "test.jsonl")
    (root / "Flickr8k.token.txt").unlink()
    with pytest.raises(DataError, match="Flickr8k.token.txt: caption file not found"):
        flickr8k.collect(root)


# --- MUSAN ---------------------------------------------------------------------------------------
@pytest.fixture
def musan_root(tmp_path):
    root = tmp_path / "musan"
    for kind, source in (("noise", "free-sound"), ("music", "fma"), ("speech", "librivox")):
        for n in range(4):
            path = root / kind / source / f"{kind}-{source}-{n:04d}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            if kind == "speech":  # constant levels: any babble of two is their mean, whatever the offsets
                write_wav(path, np.full((1, 4000 + 500 * n), 0.1 * (n + 1), np.float32))
            else:
                write_wav(path, tone(4000 + 500 * n, freq=200.0 * (n + 1)))
    (root / "noise" / "free-sound" / "ANNOTATIONS").write_text("not audio\n")
    return root


def test_musan_split_links_and_babble(musan_root, tmp_path):
    out = tmp_path / "out"
    args = (
        "musan",
        "--root",
        str(musan_root),
        "--out",
        str(out),
        "--test-fraction",
        "0.5",
        "--link",
        "--babble",
        "2",
        "--talkers",
        "2",
        "--babble-seconds",
        "0.25",
    )
    assert prepare(*args) == 0
    train, test = by_id(out / "train.jsonl"), by_id(out / "test.jsonl")
    assert len(train) == len(test) == 8
    sources = {
        split: {r["source"] for r in records.values() if r["source"] != "babble"}
        for split, records in (("train", train), ("test", test))
    }
    assert len(sources["train"]) == len(sources["test"]) == 6 and sources["train"].isdisjoint(sources["test"])
    test_speech = {test[k]["audio"] for k in ("speech_000", "speech_001")}
    assert set(test["babble_000"]["mixed"]) == set(test["babble_001"]["mixed"]) == test_speech
    for records in (train, test):
        assert sorted(records) == [
            "babble_000",
            "babble_001",
            "music_000",
            "music_001",
            "noise_000",
            "noise_001",
            "speech_000",
            "speech_001",
        ]
        for key, record in records.items():
            assert key.split("_")[0] == record["noise_type"]
    bank = NoiseBank(out / "noise" / "test")
    assert sorted(Path(f).stem for f in bank.files) == sorted(test)
    for path in bank.files:
        key = Path(path).stem
        if test[key]["noise_type"] != "babble":
            assert os.path.realpath(path) == test[key]["audio"]
            assert bank.load(bank.files.index(path)).numel() == test[key]["audio_samples"]
    levels = [load_audio(test[k]["audio"])[0] for k in ("speech_000", "speech_001")]
    babble = load_audio(test["babble_000"]["audio"])
    assert babble.numel() == 4000 and test["babble_000"]["audio_samples"] == 4000
    assert babble.mean().item() == pytest.approx(float(sum(levels) / 2), abs=1e-3)
    assert babble.std().item() < 1e-3
    assert_checks(out / "test.jsonl")
    noisy = pytest.importorskip("mmssl.eval.noisy")  # the noisy evaluation names types by file prefix
    banks = noisy.noise_banks([str(out / "noise" / "test")], None)
    assert {t: len(b) for t, b in banks.items()} == {"babble": 2, "music": 2, "noise": 2, "speech": 2}
    # a second run replaces the noise folder as a whole
    assert prepare(*args[:-6], "--babble", "1", "--talkers", "2", "--babble-seconds", "0.25") == 0
    assert sorted(p.name for p in (out / "noise" / "test").iterdir() if p.name.startswith("babble")) == [
        "babble_000.wav"
    ]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_babble_is_the_same_with_any_workers(musan_root, tmp_path):
    speech = sorted(str(p) for p in (musan_root / "speech").rglob("*.wav"))
    made = {}
    for workers in (1, 2):
        folder = tmp_path / f"w{workers}"
        folder.mkdir()
        records = musan.write_babble(
            folder, speech, 2, 0, talkers=3, seconds=0.2, seed=5, workers=workers, progress=False
        )
        made[workers] = [(r["mixed"], Path(r["audio"]).read_bytes()) for r in records]
    assert made[1] == made[2] and made[1][0] != made[1][1]


def test_musan_split_is_seeded():
    files = [f"noise/x/{i}.wav" for i in range(20)]
    first, again = musan.split_files(files, 0.1, seed=0), musan.split_files(files[::-1], 0.1, seed=0)
    assert first == again and len(first["test"]) == 2 and set(first["train"]).isdisjoint(first["test"])
    assert musan.split_files(files, 0.1, seed=1) != first
