import json

import pytest

from mmssl.data.manifest import duration_seconds, read_manifest, subset_indices, write_manifest
from mmssl.errors import ConfigError, DataError


def test_round_trip_relative_and_absolute_paths(tmp_path):
    corpus = tmp_path / "corpus"
    outside = tmp_path / "elsewhere" / "b.wav"
    records = [
        {"id": "a", "audio": str(corpus / "wav" / "a.wav"), "audio_samples": 16000, "transcript": "hi"},
        {"id": "b", "audio": str(outside), "video_frames": 50, "speaker": "s1", "my_note": [1, 2]},
    ]
    path = write_manifest(corpus / "train.jsonl", records)
    on_disk = [json.loads(line) for line in path.read_text().splitlines()]
    assert on_disk[0]["audio"] == "wav/a.wav"  # inside the folder: relative
    assert on_disk[1]["audio"] == str(outside)  # outside: as given
    back = read_manifest(path)
    assert back == records  # extra keys are kept as they are
    assert [duration_seconds(r) for r in back] == [1.0, 2.0]


def test_relative_paths_resolve_against_manifest_folder(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"id": "x", "video": "v/x.mp4", "image": "/abs/i.png"}\n\n')
    (record,) = read_manifest(tmp_path / "m.jsonl")
    assert record["video"] == str(tmp_path / "v" / "x.mp4")
    assert record["image"] == "/abs/i.png"


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "not valid JSON"),
        ('["a"]', "must be a JSON object"),
        ('{"audio": "a.wav"}', "no 'id'"),
        ('{"id": "q", "audio_samples": -3}', "'audio_samples' must be a non-negative integer"),
        ('{"id": "q", "audio": 5}', "'audio' must be a string"),
        ('{"id": "a"}', "duplicate id 'a' (first on line 1)"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "m.jsonl"
    path.write_text('{"id": "a"}\n' + line + "\n")
    with pytest.raises(DataError) as err:
        read_manifest(path)
    assert f"{path}:2: " in str(err.value) and message in str(err.value)


def test_write_rejects_duplicates_and_leaves_no_file(tmp_path):
    with pytest.raises(DataError, match="duplicate id 'a'"):
        write_manifest(tmp_path / "m.jsonl", [{"id": "a"}, {"id": "a"}])
    assert list(tmp_path.iterdir()) == []


def test_missing_manifest(tmp_path):
    with pytest.raises(DataError, match="manifest not found"):
        read_manifest(tmp_path / "nope.jsonl")


def test_subset_is_seeded_sorted_and_sized():
    assert subset_indices(10, None) == list(range(10))
    tenth = subset_indices(200, 0.1, seed=3)
    assert len(tenth) == 20 and tenth == sorted(tenth) and len(set(tenth)) == 20
    assert subset_indices(200, 0.1, seed=3) == tenth  # same seed, same records
    assert subset_indices(200, 0.1, seed=4) != tenth
    assert len(subset_indices(200, 37, seed=3)) == 37
    assert subset_indices(5, 50) == list(range(5))  # more than there are: all of them
    assert len(subset_indices(5, 0.01)) == 1  # a fraction keeps at least one record
    # a larger subset of the same seed is not a reshuffle: the first draws stay in it
    assert set(subset_indices(200, 10, seed=3)) <= set(subset_indices(200, 20, seed=3))


@pytest.mark.parametrize("bad", [0, -0.5, 1.5, True, "10%"])
def test_subset_rejects_what_is_neither_fraction_nor_count(bad):
    with pytest.raises(ConfigError, match="subset"):
        subset_indices(10, bad)
