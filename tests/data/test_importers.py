import pytest
import torch

from mmssl.cli import main
from mmssl.data.importers import read_labels, read_tsv, read_wrd
from mmssl.data.manifest import read_manifest
from mmssl.errors import DataError


def test_avhubert_tsv_wrd_to_manifest_via_cli(tmp_path):
    tsv = tmp_path / "train.tsv"
    tsv.write_text(
        "/data/lrs3\nspk1/00001\tvideo/spk1/00001.mp4\taudio/spk1/00001.wav\t50\t32000\n"
        "spk2/00002\tvideo/spk2/00002.mp4\taudio/spk2/00002.wav\t75\t48000\n"
    )
    wrd = tmp_path / "train.wrd"
    wrd.write_text("HELLO THERE\nGOOD MORNING\n")
    out = tmp_path / "out" / "train.jsonl"
    assert main(["data", "import", str(tsv), "--wrd", str(wrd), "--out", str(out)]) == 0
    records = read_manifest(out)
    assert records[1] == {
        "id": "spk2/00002",
        "video": "/data/lrs3/video/spk2/00002.mp4",
        "audio": "/data/lrs3/audio/spk2/00002.wav",
        "video_frames": 75,
        "audio_samples": 48000,
        "transcript": "GOOD MORNING",
    }


def test_fairseq_audio_only_tsv_with_relative_root(tmp_path):
    tsv = tmp_path / "valid.tsv"
    tsv.write_text("wavs\nspk/a.flac\t12345\nspk/b.flac\t800\n")
    records = read_tsv(tsv)
    assert [r["id"] for r in records] == ["spk/a", "spk/b"]
    assert records[0]["audio"] == str(tmp_path / "wavs" / "spk" / "a.flac")
    assert records[1]["audio_samples"] == 800


@pytest.mark.parametrize(
    "body, message",
    [
        ("a.wav\t10\t3\n", "got 3"),
        ("a.wav\tten\n", "sample count 'ten' is not an integer"),
        ("a.wav\t10\na.wav\t11\n", "duplicate id 'a'"),
    ],
)
def test_bad_tsv_lines(tmp_path, body, message):
    tsv = tmp_path / "x.tsv"
    tsv.write_text("/root\n" + body)
    with pytest.raises(DataError, match=message) as err:
        read_tsv(tsv)
    assert f"{tsv}:" in str(err.value)


def test_wrd_count_mismatch_is_an_error(tmp_path):
    tsv = tmp_path / "x.tsv"
    tsv.write_text("/r\na.wav\t10\nb.wav\t10\n")
    wrd = tmp_path / "x.wrd"
    wrd.write_text("ONE\n")
    assert read_wrd(wrd) == ["ONE"]
    assert main(["data", "import", str(tsv), "--wrd", str(wrd), "--out", str(tmp_path / "o.jsonl")]) == 2


def test_read_labels(tmp_path):
    km = tmp_path / "train.km"
    km.write_text("3 3 7 0\n\n12\n")
    labels = read_labels(km)
    assert [t.tolist() for t in labels] == [[3, 3, 7, 0], [], [12]]
    assert all(t.dtype == torch.long for t in labels)
    km.write_text("1 2\n1 x\n")
    with pytest.raises(DataError, match=":2: labels must be"):
        read_labels(km)
