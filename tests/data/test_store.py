"""``mmssl data pack``: a packed manifest gives the items the source manifest gives, in shards
that resume, with bad records left out and listed."""

import json

import pytest
import torch

from mmssl.cli import main
from mmssl.commands.data_pack import parse_shard
from mmssl.data.datasets import ManifestDataset
from mmssl.data.manifest import read_manifest
from mmssl.data.store import PACKED, merge, pack_shard, shard_name
from mmssl.errors import ConfigError


@pytest.fixture()
def av_manifest(synth_tiny):
    return synth_tiny / "av" / "train.jsonl"


def _items(manifest):
    data = ManifestDataset(manifest, modalities=("audio", "video"))
    return {item["id"]: item for item in (data[i] for i in range(len(data)))}


def test_packed_items_equal_the_decoded_ones_in_manifest_order(av_manifest, tmp_path):
    for shard in range(2):
        pack_shard(av_manifest, tmp_path, shard, 2, workers=1, progress=False)
    packed = merge(av_manifest, tmp_path, 2)
    assert packed == tmp_path / av_manifest.name  # same stem: the source's k-means labels fit it
    source = read_manifest(av_manifest)
    assert [r["id"] for r in read_manifest(packed)] == [r["id"] for r in source]
    decoded, stored = _items(av_manifest), _items(packed)
    assert stored.keys() == decoded.keys()
    for key, item in decoded.items():
        # 16-bit sources come back exactly (decoded samples are multiples of 1 / 32768)
        assert torch.equal(stored[key]["audio"], item["audio"])
        assert torch.equal(stored[key]["video"], item["video"])


def test_a_packed_shard_is_not_redone_and_leftovers_of_a_killed_run_do_not_count(av_manifest, tmp_path):
    name = shard_name(av_manifest.stem, 0, 2)
    (tmp_path / f"{name}.audio.i16.tmp").write_bytes(b"half")  # a run killed while writing
    first = pack_shard(av_manifest, tmp_path, 0, 2, progress=False)
    stamp = first.stat().st_mtime_ns
    assert pack_shard(av_manifest, tmp_path, 0, 2, progress=False).stat().st_mtime_ns == stamp
    assert not list(tmp_path.glob("*.tmp"))
    assert merge(av_manifest, tmp_path, 2) is None  # shard 1 is missing: no whole manifest yet


def test_bad_records_are_left_out_and_listed(av_manifest, tmp_path):
    manifest = tmp_path / "src" / "train.jsonl"
    manifest.parent.mkdir()
    records = read_manifest(av_manifest)
    records[0]["video"] = str(tmp_path / "gone.mp4")
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    part = pack_shard(manifest, tmp_path / "store", progress=False)
    kept = read_manifest(part)
    assert records[0]["id"] not in {r["id"] for r in kept} and len(kept) == len(records) - 1
    skipped = [
        json.loads(line)
        for line in (part.parent / f"{shard_name('train', 0, 1)}.skipped.jsonl").read_text().splitlines()
    ]
    assert skipped[0]["id"] == records[0]["id"] and "gone.mp4" in skipped[0]["reason"]
    assert all(r[PACKED]["index"] == i + 1 for i, r in enumerate(kept))


def test_the_command_packs_and_says_where(av_manifest, tmp_path, capsys):
    assert (
        main(["data", "pack", str(av_manifest), "--out", str(tmp_path), "--workers", "1", "--no-progress"])
        == 0
    )
    assert f"wrote {tmp_path / 'train.jsonl'}" in capsys.readouterr().out
    assert main(["data", "pack", str(av_manifest), "--out", str(tmp_path), "--shard", "2/2"]) == 2


@pytest.mark.parametrize("spec", ["1", "a/b", "3/2", "-1/2"])
def test_shard_spec_is_checked(spec):
    with pytest.raises(ConfigError, match="--shard"):
        parse_shard(spec)


def test_a_relative_output_folder_packs_a_manifest_that_reads_from_anywhere(
    av_manifest, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    pack_shard(av_manifest, "store", progress=False)
    packed = merge(av_manifest, "store", 1)
    monkeypatch.chdir(av_manifest.parent)  # read from elsewhere: the files are found beside the manifest
    data = ManifestDataset(tmp_path / packed, modalities=("audio", "video"))
    assert data[0] is not None and data.bad_count == 0
    assert json.loads((tmp_path / packed).read_text().splitlines()[0])[PACKED]["file"] == shard_name(
        "train", 0, 1
    )


def test_packed_records_are_read_without_their_source_files(synth_tiny, tmp_path):
    import shutil

    from mmssl.data.store import record_audio, record_video

    source = tmp_path / "src"
    shutil.copytree(synth_tiny / "av", source)
    pack_shard(source / "valid.jsonl", tmp_path / "store", progress=False)
    packed = read_manifest(merge(source / "valid.jsonl", tmp_path / "store", 1))
    decoded = [(record_audio(r), record_video(r)) for r in read_manifest(source / "valid.jsonl")]
    shutil.rmtree(source)  # k-means, layer features and the dataset read the packed slices alone
    for record, (audio, video) in zip(packed, decoded, strict=True):
        assert torch.equal(record_audio(record), audio) and torch.equal(record_video(record), video)
