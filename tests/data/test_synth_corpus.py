"""The generated corpus as written by ``mmssl synth --size tiny`` (the ``synth_tiny`` fixture)."""

import json
import os
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

from mmssl.data.io import load_audio, load_image, load_video
from mmssl.data.manifest import read_manifest
from mmssl.data.synth import SynthConfig, config_for, generate, grammar, phonemes, scenes
from mmssl.data.synth.corpus import CAPTIONS_PER_IMAGE, SPLITS
from mmssl.data.synth.noise_sounds import NOISE_KINDS

FRAME = 640  # samples per 25 fps video frame at 16 kHz


def _records(root: Path, task: str) -> dict[str, list[dict]]:
    return {split: read_manifest(root / task / f"{split}.jsonl") for split in SPLITS}


def _align(record: dict, root: Path) -> dict:
    return json.loads((root / record["align"]).read_text())


def test_counts_follow_the_preset(synth_tiny):
    cfg = config_for("tiny")
    av, image = _records(synth_tiny, "av"), _records(synth_tiny, "image")
    assert [len(av[s]) for s in SPLITS] == list(cfg.av)
    assert [len(image[s]) for s in SPLITS] == [n * CAPTIONS_PER_IMAGE for n in cfg.images]
    for split in ("train", "test"):
        names = sorted(p.name for p in (synth_tiny / "noise" / split).glob("*.wav"))
        assert names == sorted(f"{k}_{i:03d}.wav" for k in NOISE_KINDS for i in range(cfg.noise_files))
    summary = json.loads((synth_tiny / "synth.json").read_text())
    assert summary["counts"]["av"] == dict(zip(SPLITS, cfg.av))


def test_av_media_agree_in_length(synth_tiny):
    for records in _records(synth_tiny, "av").values():
        for r in records:
            assert r["audio_samples"] == r["video_frames"] * FRAME
            with wave.open(r["audio"]) as w:
                assert (w.getframerate(), w.getnchannels(), w.getnframes()) == (16000, 1, r["audio_samples"])
            video = load_video(r["video"])
            assert tuple(video.shape) == (r["video_frames"], 88, 88)
            track = load_audio(r["video"])  # the mp4's own AAC track
            assert abs(track.numel() - r["audio_samples"]) <= FRAME
            wav = load_audio(r["audio"])
            n = min(track.numel(), wav.numel())
            corr = np.corrcoef(track[:n].numpy(), wav[:n].numpy())[0, 1]
            assert corr > 0.9  # the same speech, not just the same length


def test_alignments_cover_the_audio_and_match_the_transcript(synth_tiny):
    for task in ("av", "image"):
        for records in _records(synth_tiny, task).values():
            for r in records:
                doc = _align(r, synth_tiny / task)
                spans = doc["phonemes"]
                assert spans[0][1] == 0 and spans[-1][2] == r["audio_samples"]
                assert all(a[2] == b[1] and a[1] < a[2] for a, b in zip(spans, spans[1:]))
                assert [w for w, _, _ in doc["words"]] == r["transcript"].split()
                assert all(0 <= s < e <= r["audio_samples"] for _, s, e in doc["words"])
                assert any(name == "" for name, _, _ in spans[:1] + spans[-1:])  # quiet edges


def test_speech_is_where_the_alignment_says(synth_tiny):
    vowels, leading = [], []
    for r in _records(synth_tiny, "av")["train"]:
        wav = load_audio(r["audio"]).numpy()
        for name, s, e in _align(r, synth_tiny / "av")["phonemes"]:
            rms = float(np.sqrt(np.mean(wav[s:e] ** 2)))
            if name == "" and s == 0:
                leading.append(rms)  # the quiet before the speech
            elif phonemes.phoneme_class(name).startswith("vowel"):
                vowels.append(rms)
    assert np.median(vowels) > 20 * np.median(leading)


def test_lips_move_with_the_phonemes(synth_tiny):
    """Decoded mouth frames are darker (open cavity) inside open vowels than inside p/b/m."""
    open_dark, closed_dark = [], []
    for r in _records(synth_tiny, "av")["train"]:
        video = load_video(r["video"]).numpy()
        for name, s, e in _align(r, synth_tiny / "av")["phonemes"]:
            cls = phonemes.phoneme_class(name)
            if e - s < FRAME or cls not in ("vowel_open", "bilabial", "nasal_m"):
                continue
            frame = video[min((s + e) // 2 // FRAME, len(video) - 1)]
            dark = float((frame < 50).mean())
            (open_dark if cls == "vowel_open" else closed_dark).append(dark)
    assert len(open_dark) > 10 and len(closed_dark) > 5
    assert np.mean(open_dark) > 2 * np.mean(closed_dark) + 0.005


def test_speakers_are_disjoint_between_splits(synth_tiny):
    summary = json.loads((synth_tiny / "synth.json").read_text())["speakers"]
    by_split = {s: set() for s in SPLITS}
    for task in ("av", "image"):
        for split, records in _records(synth_tiny, task).items():
            by_split[split] |= {r["speaker"] for r in records}
            assert {r["speaker"] for r in records} <= set(summary[split])
    assert not by_split["train"] & by_split["test"]
    assert not by_split["train"] & by_split["valid"] and not by_split["valid"] & by_split["test"]
    held = set(summary["babble_train"]) | set(summary["babble_test"])
    assert not held & set().union(*by_split.values())


def test_captions_parse_back_to_their_image(synth_tiny):
    groups: dict[str, list[tuple[str, dict]]] = {}
    for split, records in _records(synth_tiny, "image").items():
        for r in records:
            groups.setdefault(r["group"], []).append((split, r))
    for group, members in groups.items():
        assert len(members) == CAPTIONS_PER_IMAGE
        assert len({split for split, _ in members}) == 1  # a group never straddles splits
        assert len({r["image"] for _, r in members}) == 1
        assert len({r["speaker"] for _, r in members}) == CAPTIONS_PER_IMAGE
        assert len({r["caption"] for _, r in members}) == CAPTIONS_PER_IMAGE  # five different captions
        scene_doc = members[0][1]["scene"]
        scene = scenes.scene_from_record(scene_doc)
        placed = [scenes.Placed(**o) for o in scene_doc["objects"]]
        assert scenes.relation_holds(scene.relation, *placed)
        picture = load_image(members[0][1]["image"])  # (3, H, W)
        assert tuple(picture.shape) == (3, 224, 224)
        for p in placed:  # (3, H, W) uint8 RGB: each object is drawn in its colour
            pixel = picture[:, int(round(p.y)), int(round(p.x))].numpy().astype(int)
            assert np.abs(pixel - scenes.RGB[p.colour]).max() <= 2
        for _, r in members:
            assert r["transcript"] == r["caption"]
            assert grammar.agrees(grammar.parse(r["caption"]), scene), (group, r["caption"])


def test_noise_bank_files(synth_tiny):
    cfg = config_for("tiny")
    for split in ("train", "test"):
        for path in (synth_tiny / "noise" / split).glob("*.wav"):
            with wave.open(str(path)) as w:
                assert (w.getframerate(), w.getnchannels()) == (16000, 1)
                assert w.getnframes() == int(cfg.noise_seconds * 16000)
            x = load_audio(path).numpy()
            assert 0.05 < float(np.sqrt(np.mean(x**2))) < 0.2
    train = load_audio(synth_tiny / "noise" / "train" / "white_000.wav").numpy()
    test = load_audio(synth_tiny / "noise" / "test" / "white_000.wav").numpy()
    assert abs(np.corrcoef(train, test)[0, 1]) < 0.05  # separate files, not copies
    pink = load_audio(synth_tiny / "noise" / "train" / "pink_000.wav").numpy()
    spec = np.abs(np.fft.rfft(pink)) ** 2
    freqs = np.fft.rfftfreq(pink.size, 1 / 16000)
    low, high = spec[(freqs > 100) & (freqs < 200)].mean(), spec[(freqs > 3200) & (freqs < 6400)].mean()
    assert 10 < low / high < 60  # 1/f: about 1/32 of the power per bin, 5 octaves up


@pytest.mark.parametrize("task", ["av", "image"])
def test_data_check_passes(synth_tiny, task):
    from mmssl.cli import main

    for split in SPLITS:
        assert main(["data", "check", str(synth_tiny / task / f"{split}.jsonl")]) == 0


def test_same_seed_same_bytes_with_any_worker_count(synth_tiny, tmp_path):
    from mmssl.cli import main

    assert main(["synth", "--size", "tiny", "--out", str(tmp_path), "--workers", "2", "--quiet"]) == 0
    for task in ("av", "image"):
        for split in SPLITS:
            assert (tmp_path / task / f"{split}.jsonl").read_bytes() == (
                synth_tiny / task / f"{split}.jsonl"
            ).read_bytes()
    wavs = sorted(p.relative_to(synth_tiny) for p in synth_tiny.rglob("*.wav"))
    assert len(wavs) > 50
    assert all((tmp_path / p).read_bytes() == (synth_tiny / p).read_bytes() for p in wavs)
    mp4s = sorted(p.relative_to(synth_tiny) for p in synth_tiny.rglob("*.mp4"))
    assert all((tmp_path / p).read_bytes() == (synth_tiny / p).read_bytes() for p in mp4s)


def test_another_seed_gives_another_corpus(synth_tiny, tmp_path):
    small = SynthConfig(seed=1, av=(2, 1, 1), images=(1, 1, 1), noise_seconds=0.5)
    generate(small, tmp_path, workers=1, progress=False)
    ours = read_manifest(synth_tiny / "av" / "train.jsonl")[:2]
    theirs = read_manifest(tmp_path / "av" / "train.jsonl")
    assert [r["transcript"] for r in theirs] != [r["transcript"] for r in ours]
    assert json.loads((tmp_path / "synth.json").read_text())["counts"]["image"]["test"] == CAPTIONS_PER_IMAGE


def test_synth_workers_do_not_load_torch():
    """The corpus's worker processes fork once per utterance (espeak-ng), and a fork costs what
    the process has mapped: the generator's modules must not import torch (measured: the demo
    corpus in 156 s instead of 178 s on 2 cores, with half the system time)."""
    code = "import sys, mmssl.data.synth.corpus; print('torch' in sys.modules)"
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
