import pytest

from mmssl.cli import main
from mmssl.data.check import check_record, format_report, inspect_record
from mmssl.data.manifest import write_manifest


def _reasons(record, **kw):
    return [reason for _, _, reason in check_record(record, **kw)]


def test_good_records_pass(media):
    assert (
        _reasons(
            {
                "id": "a",
                "audio": str(media.mkv),
                "video": str(media.mkv),
                "audio_samples": 32000,
                "video_frames": 50,
            }
        )
        == []
    )
    assert _reasons({"id": "b", "audio": str(media.mp4_h264), "video": str(media.mp4_30fps)}) == []
    assert _reasons({"id": "c", "audio": str(media.wav), "image": str(media.png)}) == []


def test_records_training_reads_by_converting_pass_with_notes(media):
    """Resampling and downmixing are what the loader does, not defects; AAC priming that the
    mp4 does not mark (PyAV muxing untimed frames) is dropped, so audio and video agree."""
    wav44, mp4, mp4_48k, mp4_30 = (
        str(p) for p in (media.wav44, media.mp4_unmarked, media.mp4_unmarked48, media.mp4_30fps)
    )
    assert inspect_record({"id": "w", "audio": wav44, "audio_samples": 32000}).notes == [
        ("w", wav44, "audio resampled 44100 Hz -> 16000 Hz"),
        ("w", wav44, "2 audio channels averaged to mono"),
    ]
    assert check_record({"id": "w", "audio": wav44, "audio_samples": 32000}) == []
    for path in (mp4, mp4_48k):
        report = inspect_record(
            {"id": "p", "audio": path, "video": path, "audio_samples": 32000, "video_frames": 50}
        )
        assert report.problems == []
    assert report.notes == [("p", mp4_48k, "audio resampled 48000 Hz -> 16000 Hz")]
    assert inspect_record({"id": "v", "video": mp4_30}).notes == [
        ("v", mp4_30, "video 30 fps read at 25 fps (frames dropped or repeated)")
    ]


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
    reasons = _reasons({"id": "m", "video": str(media.mkv), "video_frames": 40})
    assert reasons == ["manifest says 40 video frames, decoded 50", "no audio path"]


def test_cli_table_summary_and_exit_status(media, tmp_path, capsys):
    good = tmp_path / "good.jsonl"
    write_manifest(good, [{"id": "g", "audio": str(media.wav)}])
    assert main(["data", "check", str(good), "--workers", "1", "--no-progress"]) == 0
    assert "1 records checked, 0 bad (0.0%)" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    write_manifest(
        bad,
        [
            {"id": "g", "audio": str(media.wav)},
            {"id": "n", "audio": str(media.missing)},
            {"id": "s", "audio": str(media.silent)},
        ],
    )
    assert main(["data", "check", str(bad), "--workers", "2", "--no-progress"]) == 1
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["id", "file", "reason"]
    assert lines[1].split()[:2] == ["n", str(media.missing)] and lines[1].endswith("missing file")
    assert lines[2].split()[:2] == ["s", str(media.silent)]
    assert "3 records checked, 2 bad (66.7%)" in out


def test_cli_passes_converted_records_and_counts_their_notes(media, tmp_path, capsys):
    manifest = tmp_path / "converted.jsonl"
    write_manifest(
        manifest,
        [
            {"id": "a", "audio": str(media.wav44)},
            {"id": "b", "audio": str(media.wav44)},
            {"id": "c", "audio": str(media.mp4_unmarked), "video": str(media.mp4_unmarked)},
        ],
    )
    assert main(["data", "check", str(manifest), "--workers", "1", "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "3 records checked, 0 bad (0.0%)"
    assert lines[1] == "2 records read with conversions (notes, not problems):"
    assert lines[2].split()[:6] == ["2", "audio", "resampled", "44100", "Hz", "->"]
    assert lines[2].endswith(f"(e.g. {media.wav44})")
    assert lines[3].split()[:2] == ["2", "2"] and "averaged to mono" in lines[3]


def test_report_counts_kinds():
    problems = [
        ("a", "f", "manifest says 10 audio samples, decoded 5"),
        ("b", "g", "manifest says 20 audio samples, decoded 9"),
    ]
    report = format_report(4, problems)
    assert "4 records checked, 2 bad (50.0%)" in report
    assert "2  manifest says N audio samples, decoded N" in report


def test_an_empty_manifest_a_record_without_audio_and_a_negative_tolerance_fail(media, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["data", "check", str(empty), "--workers", "1", "--no-progress"]) == 2
    assert f"{empty}: the manifest has no records" in capsys.readouterr().err
    no_audio = tmp_path / "no_audio.jsonl"
    write_manifest(no_audio, [{"id": "v", "video": str(media.mkv)}, {"id": "i", "image": str(media.png)}])
    assert main(["data", "check", str(no_audio), "--workers", "1", "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "2 records checked, 2 bad (100.0%)" in out and out.count("no audio path") == 3  # 2 + summary
    good = tmp_path / "good.jsonl"
    write_manifest(good, [{"id": "g", "audio": str(media.mkv), "video": str(media.mkv)}])
    assert main(["data", "check", str(good), "--av-tolerance", "-1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--av-tolerance must be 0 or more seconds" in err
