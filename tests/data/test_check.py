import pytest

from mmssl.cli import main
from mmssl.data.check import check_record, format_report
from mmssl.data.manifest import write_manifest


def _reasons(record, **kw):
    return [reason for _, _, reason in check_record(record, **kw)]


def test_good_records_pass(media):
    assert _reasons({"id": "a", "audio": str(media.mkv), "video": str(media.mkv),
                     "audio_samples": 32000, "video_frames": 50}) == []
    assert _reasons({"id": "b", "audio": str(media.mp4_h264), "video": str(media.mp4_30fps)}) == []
    assert _reasons({"id": "c", "image": str(media.png)}) == []


def test_audio_video_length_disagreement(media):
    record = {"id": "s", "audio": str(media.short_video), "video": str(media.short_video)}
    (reason,) = _reasons(record)
    assert "audio lasts 2.000 s, video 1.600 s" in reason
    assert _reasons(record, tolerance=0.5) == []


@pytest.mark.parametrize(
    "name, expected",
    [
        ("wav8k", "sample rate 8000 Hz, expected 16000 Hz"),
        ("silent", "all-silent audio"),
        ("nan_wav", "10 NaN or infinite audio samples"),
        ("missing", "missing file"),
        ("empty_wav", "zero-length audio"),
        ("corrupt", "cannot open"),
    ],
)
def test_bad_audio_reasons(media, name, expected):
    path = str(getattr(media, name))
    problems = check_record({"id": "x", "audio": path})
    assert len(problems) == 1
    key, file, reason = problems[0]
    assert (key, file) == ("x", path) and expected in reason


def test_truncated_file_flagged(media):
    reasons = _reasons({"id": "t", "audio": str(media.truncated_mkv), "video": str(media.truncated_mkv)})
    assert len(reasons) == 1
    assert reasons[0].startswith("truncated: decoded 0.")
    assert reasons[0].endswith("of the 2.000 s the file declares")


def test_zero_length_video(media):
    record = {"id": "z", "audio": str(media.no_frames), "video": str(media.no_frames)}
    assert check_record(record) == [("z", str(media.no_frames), "zero-length video (no frame decoded)")]


def test_manifest_counts_must_match_decoded(media):
    (reason,) = _reasons({"id": "m", "audio": str(media.wav), "audio_samples": 48000})
    assert reason == "manifest says 48000 audio samples, decoded 32000"
    (reason,) = _reasons({"id": "m", "video": str(media.mkv), "video_frames": 40})
    assert reason == "manifest says 40 video frames, decoded 50"


def test_cli_table_summary_and_exit_status(media, tmp_path, capsys):
    good = tmp_path / "good.jsonl"
    write_manifest(good, [{"id": "g", "audio": str(media.wav)}])
    assert main(["data", "check", str(good), "--workers", "1", "--no-progress"]) == 0
    assert "1 records checked, 0 bad (0.0%)" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    write_manifest(bad, [
        {"id": "g", "audio": str(media.wav)},
        {"id": "n", "audio": str(media.missing)},
        {"id": "s", "audio": str(media.silent)},
    ])
    assert main(["data", "check", str(bad), "--workers", "2", "--no-progress"]) == 1
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["id", "file", "reason"]
    assert lines[1].split()[:2] == ["n", str(media.missing)] and lines[1].endswith("missing file")
    assert lines[2].split()[:2] == ["s", str(media.silent)]
    assert "3 records checked, 2 bad (66.7%)" in out


def test_report_counts_kinds():
    problems = [("a", "f", "manifest says 10 audio samples, decoded 5"),
                ("b", "g", "manifest says 20 audio samples, decoded 9")]
    report = format_report(4, problems)
    assert "4 records checked, 2 bad (50.0%)" in report
    assert "2  manifest says N audio samples, decoded N" in report
