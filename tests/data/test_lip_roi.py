import json
import pickle

import av
import numpy as np
import pytest

from mmssl.cli import main
from mmssl.data.io import load_audio, load_video
from mmssl.data.lip_roi import (
    crop_mouths,
    default_finder,
    find_mouths,
    landmark_file,
    landmark_track,
    read_landmarks,
    smooth_track,
    write_av,
)
from mmssl.errors import DataError

skdata = pytest.importorskip("skimage.data")

# where the astronaut's mouth is in skimage.data.astronaut() (x, y), read off the image
MOUTH = np.array([224.0, 145.0])
STEP = np.array([3.0, 2.0])  # the face moves by this many pixels per frame
ORIGIN = np.array([60, 20])  # top-left corner of frame 0's window in the photo


def _face_frames(n=8):
    rgb = skdata.astronaut()
    gray = (rgb @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)
    frames = []
    for t in range(n):
        x, y = ORIGIN - (STEP * t).astype(int)  # window moves up-left: the face moves down-right
        frames.append(gray[y : y + 320, x : x + 320])
    return np.stack(frames)


def _expected(t):
    return MOUTH - ORIGIN + STEP * t


@pytest.fixture(scope="module")
def frames():
    return _face_frames()


@pytest.fixture(scope="module")
def track(frames):
    return find_mouths(frames, default_finder())


def test_detected_mouth_follows_the_known_shift(track):
    centres, sides = smooth_track(*track)
    n = len(centres)
    expected = np.stack([_expected(t) for t in range(n)])
    assert np.abs(centres - expected).max() < 8.0  # the cascade's box jitters by a few pixels
    slope = np.polyfit(np.arange(n), centres, 1)[0]  # (2,) pixels per frame
    np.testing.assert_allclose(slope, STEP, atol=1.0)
    assert (sides > 40).all() and (sides < 120).all()


def test_crops_show_the_same_mouth_in_every_frame(frames, track):
    centres, sides = smooth_track(*track)
    crops = crop_mouths(frames, centres, sides, 88).astype(np.float64)
    assert crops.shape == (len(frames), 88, 88)
    first = crops[0] - crops[0].mean()
    for crop in crops[1:]:
        c = crop - crop.mean()
        assert (first * c).sum() / np.sqrt((first**2).sum() * (c**2).sum()) > 0.8
    # and a crop elsewhere in the frame does not look like it
    off = crop_mouths(frames[:1], centres[:1] + [0, -110], sides[:1], 88)[0].astype(np.float64)
    off -= off.mean()
    assert (first * off).sum() / np.sqrt((first**2).sum() * (off**2).sum()) < 0.5


def test_smoothing_fills_gaps_and_keeps_linear_motion():
    t = np.arange(9, dtype=np.float64)
    centres = np.stack([10 + 2 * t, 5 - t], 1)
    sides = 30 + 0 * t
    centres[3] = np.nan
    sides[3] = np.nan
    c, s = smooth_track(centres, sides, window=5)
    np.testing.assert_allclose(c, np.stack([10 + 2 * t, 5 - t], 1))
    np.testing.assert_allclose(s, 30.0)
    with pytest.raises(DataError, match="clip.mp4: no face"):
        smooth_track(np.full((4, 2), np.nan), np.full(4, np.nan), what="clip.mp4")


def test_landmarks_give_the_mouth(tmp_path):
    pts = np.zeros((68, 2))
    pts[48:68] = [100.0, 50.0]
    pts[48], pts[54] = [90.0, 50.0], [110.0, 50.0]
    pts[48:68, 1] += np.linspace(-2, 2, 20)
    marks = [pts, None, pts + [4, 0]]
    with open(tmp_path / "a.pkl", "wb") as f:
        pickle.dump(marks, f)
    read = read_landmarks(tmp_path / "a.pkl")
    assert read[1] is None
    centres, sides = landmark_track(read)
    np.testing.assert_allclose(centres[0], pts[48:68].mean(0))
    np.testing.assert_allclose(sides[[0, 2]], 1.8 * np.hypot(20.0, pts[54, 1] - pts[48, 1]))
    assert np.isnan(sides[1])
    np.save(tmp_path / "bad.npy", np.zeros((2, 20, 2)))
    with pytest.raises(DataError, match="bad.npy: frame 0 has 20 landmarks"):
        read_landmarks(tmp_path / "bad.npy")


def _face_video(path, frames, seconds):
    t = np.arange(int(seconds * 16000)) / 16000
    write_av(path, frames, 0.3 * np.sin(2 * np.pi * 220 * t))


def test_cli_writes_mouth_video_with_audio(tmp_path, frames):
    src = tmp_path / "face.mp4"
    _face_video(src, frames, len(frames) / 25)
    assert main(["data", "lips", str(src), "--out", str(tmp_path / "out"), "--size", "88"]) == 0
    out = tmp_path / "out" / "face.mp4"
    video = load_video(out).numpy()
    assert video.shape == (len(frames), 88, 88)
    audio = load_audio(out)
    assert len(audio) == len(frames) * 640  # trimmed to the video; AAC priming and padding dropped
    with av.open(str(out)) as c:
        assert float(c.streams.video[0].average_rate) == 25.0
        first = next(c.demux(c.streams.audio[0]))
        assert first.pts < 0  # the mp4 marks the AAC priming (edit list), for any player too
    decoded = load_video(src).numpy()  # what the command read
    ref = crop_mouths(decoded, *smooth_track(*find_mouths(decoded, default_finder())), 88).astype(float)
    assert np.abs(video.astype(float) - ref).mean() < 3.0  # the same crops, up to H.264 loss


def test_cli_rewrites_a_manifest_with_landmarks(tmp_path, frames):
    (tmp_path / "data").mkdir()
    _face_video(tmp_path / "data" / "clip.mp4", frames[:4], 4 / 25)
    (tmp_path / "data" / "m.jsonl").write_text(
        json.dumps({"id": "u1", "video": "clip.mp4", "audio": "clip.mp4"}) + "\n"
    )
    marks = np.zeros((4, 68, 2))
    marks[:, :, 0], marks[:, :, 1] = 160.0, 125.0
    marks[:, 48, 0], marks[:, 54, 0] = 140.0, 180.0
    (tmp_path / "lm").mkdir()
    np.save(tmp_path / "lm" / "clip.npy", marks)
    args = [
        "data",
        "lips",
        str(tmp_path / "data" / "m.jsonl"),
        "--out",
        str(tmp_path / "out"),
        "--landmarks",
        str(tmp_path / "lm"),
    ]
    assert main(args) == 0
    rec = json.loads((tmp_path / "out" / "m.jsonl").read_text())
    assert rec["video_frames"] == 4 and rec["video"] == "lips/u1.mp4"
    assert (tmp_path / "out" / rec["audio"]).resolve() == (tmp_path / "data" / "clip.mp4").resolve()
    assert load_video(tmp_path / "out" / rec["video"]).shape == (
        4,
        96,
        96,
    )  # the default: AV-HuBERT's stored size


def test_landmarks_are_found_by_record_id_when_clip_names_repeat(tmp_path, frames):
    """LRS3 names clips 00001, 00002... in every talk folder; AV-HuBERT's landmark tree mirrors
    the ids (trainval/<talk>/<clip>.pkl), so each record must get its own talk's landmarks."""
    records = []
    for talk, x in (("talkA", 150.0), ("talkB", 170.0)):
        (tmp_path / "data" / talk).mkdir(parents=True)
        _face_video(tmp_path / "data" / talk / "00001.mp4", frames[:3], 3 / 25)
        records.append({"id": f"trainval/{talk}/00001", "video": f"{talk}/00001.mp4"})
        marks = np.zeros((3, 68, 2))
        marks[:, :, 0], marks[:, :, 1] = x, 125.0
        marks[:, 48, 0], marks[:, 54, 0] = x - 20.0, x + 20.0
        (tmp_path / "lm" / "trainval" / talk).mkdir(parents=True)
        np.save(tmp_path / "lm" / "trainval" / talk / "00001.npy", marks)
    (tmp_path / "data" / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    found = [landmark_file(str(tmp_path / "lm"), tmp_path / "data" / r["video"], r["id"]) for r in records]
    assert found == [tmp_path / "lm" / "trainval" / t / "00001.npy" for t in ("talkA", "talkB")]
    args = [
        "data",
        "lips",
        str(tmp_path / "data" / "m.jsonl"),
        "--out",
        str(tmp_path / "out"),
        "--landmarks",
        str(tmp_path / "lm"),
    ]
    assert main(args) == 0
    a, b = (
        load_video(tmp_path / "out" / "lips" / "trainval" / t / "00001.mp4").float()
        for t in ("talkA", "talkB")
    )
    assert a.shape == b.shape and (a - b).abs().mean() > 1.0  # crops at different mouths
    with pytest.raises(DataError, match=r"\(looked for nope.pkl, nope.npy, x.pkl, x.npy\)$"):
        landmark_file(str(tmp_path / "lm"), tmp_path / "x.mp4", "nope")
    # a record named after its video: each name once, not "x.pkl|.npy or x.pkl|.npy"
    with pytest.raises(DataError, match=r"no landmark file in .*lm \(looked for x.pkl, x.npy\)$"):
        landmark_file(str(tmp_path / "lm"), tmp_path / "x.mp4", "x")


def test_cli_names_a_missing_file(tmp_path, capsys):
    assert main(["data", "lips", str(tmp_path / "nope.mp4"), "--out", str(tmp_path)]) == 2
    assert "nope.mp4" in capsys.readouterr().err
