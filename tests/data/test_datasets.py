import logging

import pytest
import torch

from mmssl.data.collate import collate
from mmssl.data.datasets import LIP_MEAN, LIP_STD, ManifestDataset, lip_frames
from mmssl.data.io import load_video
from mmssl.data.manifest import write_manifest
from mmssl.errors import ConfigError, DataError


def test_lip_frames_centre_crop_and_normalise():
    frames = torch.randint(0, 256, (3, 100, 104), dtype=torch.uint8)
    out = lip_frames(frames)
    assert out.shape == (3, 1, 96, 96)  # AV-HuBERT's stored size: room for random 88x88 windows
    # (100 - 96) // 2 = 2 rows and (104 - 96) // 2 = 4 columns cut from the top-left
    expected = (frames[:, 2:98, 4:100].float() / 255 - LIP_MEAN) / LIP_STD
    torch.testing.assert_close(out[:, 0], expected)
    assert lip_frames(frames[:, :90, :92]).shape == (3, 1, 90, 90)  # between 88 and 96: the centre square
    assert lip_frames(frames, size=88).shape == (3, 1, 88, 88)
    with pytest.raises(DataError, match="smaller than the 88x88"):
        lip_frames(torch.zeros(2, 64, 64, dtype=torch.uint8))


def test_av_items_labels_and_batch_consistency(media, tmp_path):
    manifest = tmp_path / "train.jsonl"
    write_manifest(
        manifest,
        [
            {"id": "a", "audio": str(media.mkv), "video": str(media.mkv), "transcript": "one"},
            {
                "id": "b",
                "audio": str(media.short_video),
                "video": str(media.short_video),
                "transcript": "two",
            },
        ],
    )
    km_dir = tmp_path / "km"
    km_dir.mkdir()
    (km_dir / "train.km").write_text("1 2 3\n4 5\n")
    # b's video is 0.4 s shorter than its audio: accepted here with a loose tolerance
    ds = ManifestDataset(str(manifest), modalities=("audio", "video"), labels=str(km_dir), av_tolerance=0.5)
    items = [ds[0], ds[1]]
    assert items[0]["targets"].tolist() == [1, 2, 3] and items[1]["transcript"] == "two"
    assert items[0]["video"].shape == (50, 1, 96, 96) and items[1]["video"].shape == (40, 1, 96, 96)
    torch.testing.assert_close(items[0]["video"], lip_frames(load_video(media.mkv)))
    assert "image" not in items[0] and "text" not in items[0]
    batch = collate(items)
    for i, item in enumerate(items):  # the padded batch holds each item unchanged
        n, t = int(batch["audio_lens"][i]), int(batch["video_lens"][i])
        torch.testing.assert_close(batch["audio"][i, :n], item["audio"])
        torch.testing.assert_close(batch["video"][i, :t], item["video"])
        assert (batch["audio"][i, n:] == 0).all()


def test_length_mismatch_and_truncation_are_skipped_and_counted(media):
    records = [
        {
            "id": "ok",
            "audio": str(media.mkv),
            "video": str(media.mkv),
            "audio_samples": 32000,
            "video_frames": 50,
        },
        {"id": "short", "audio": str(media.short_video), "video": str(media.short_video)},
        {
            "id": "cut",
            "audio": str(media.truncated_mkv),
            "video": str(media.truncated_mkv),
            "audio_samples": 32000,
            "video_frames": 50,
        },
        {"id": "liar", "audio": str(media.mkv), "audio_samples": 48000},
    ]
    ds = ManifestDataset(records, modalities=("audio", "video"), max_bad_fraction=1.0)
    assert ds[0] is not None
    assert ds[1] is None and ds[2] is None and ds.bad_count == 2
    audio_only = ManifestDataset(records, modalities=("audio",), max_bad_fraction=1.0)
    assert audio_only[1] is not None  # without video there is nothing to disagree with
    assert audio_only[3] is None and audio_only.bad_count == 1
    with pytest.raises(DataError, match="decoded 32000 audio samples, the manifest says 48000"):
        audio_only._load(3, records[3])
    with pytest.raises(DataError, match="audio lasts 2.000 s and video 1.600 s"):
        ds._load(1, records[1])


def test_durations_from_counts(tmp_path):
    ds = ManifestDataset([{"id": "a", "audio_samples": 8000}, {"id": "b", "video_frames": 10}])
    assert ds.durations() == [0.5, 0.4]
    with pytest.raises(DataError, match="record 'c' has neither"):
        ManifestDataset([{"id": "c"}]).durations()


def test_text_and_image(media):
    records = [{"id": "i", "image": str(media.png), "caption": "a cat"}]

    def tokenizer(s):
        return torch.tensor([[len(w) for w in s.split()]])  # (1, L) like open_clip

    item = ManifestDataset(records, ("image", "text"), text_tokenizer=tokenizer)[0]
    assert item["text"].tolist() == [1, 3]
    torch.testing.assert_close(item["image"], torch.from_numpy(media.rgb).permute(2, 0, 1).float() / 255)
    with pytest.raises(ConfigError, match="needs a text_tokenizer"):
        ManifestDataset(records, ("text",))


def test_captions_without_a_group_are_grouped_by_their_image_file(media):
    records = [{"id": "a", "image": str(media.png)}, {"id": "b", "image": str(media.png), "group": "g7"}]
    data = ManifestDataset(records, ("image",))
    assert [data[0]["group"], data[1]["group"]] == [str(media.png), "g7"]
    assert "group" not in ManifestDataset([{"id": "c", "audio": str(media.wav)}], ("audio",))[0]


def test_label_count_must_match(tmp_path):
    km = tmp_path / "x.km"
    km.write_text("1\n")
    with pytest.raises(DataError, match="1 label lines for 2 records"):
        ManifestDataset([{"id": "a"}, {"id": "b"}], labels=str(km))
    with pytest.raises(ConfigError, match="not found"):
        ManifestDataset([{"id": "a"}], labels=str(tmp_path / "nope.km"))


def test_skip_and_count_then_stop_at_fraction(media, caplog):
    # 1 bad in every 10: tolerated at 20 %, not at 5 %
    records = [{"id": f"r{i}", "audio": str(media.missing if i % 10 == 3 else media.wav)} for i in range(40)]
    ds = ManifestDataset(records, max_bad_fraction=0.2)
    with caplog.at_level(logging.WARNING, logger="mmssl.data.datasets"):
        out = [ds[i] for i in range(40)]
    assert [i for i, item in enumerate(out) if item is None] == [3, 13, 23, 33]
    assert ds.bad_count == 4 and ds.seen == 40
    assert sum("skipping bad record" in r.message for r in caplog.records) == 1  # once per reason
    strict = ManifestDataset(records, max_bad_fraction=0.05)  # judged from 20 records on
    for i in range(23):
        strict[i]  # 2 bad in 20 seen (10 %) is first judged at the next bad record
    with pytest.raises(DataError, match="3 of 24 records seen are bad"):
        strict[23]


def test_missing_path_for_wanted_modality_is_a_bad_record():
    ds = ManifestDataset([{"id": "a", "audio": "/x.wav"}], modalities=("video",), max_bad_fraction=1.0)
    assert ds[0] is None and ds.bad_count == 1


def test_loader_with_bucket_sampler_in_a_worker(media):
    from torch.utils.data import DataLoader

    from mmssl.data.samplers import BucketBatchSampler

    records = [{"id": f"r{i}", "audio": str(media.wav), "audio_samples": 32000} for i in range(6)]
    records[4]["audio"] = str(media.missing)
    ds = ManifestDataset(records, max_bad_fraction=0.5, min_seen=1)
    sampler = BucketBatchSampler(ds.durations(), max_seconds=4.0, seed=0)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=1)
    batches = list(loader)
    assert sorted(i for b in batches for i in b["ids"]) == ["r0", "r1", "r2", "r3", "r5"]
    assert all(b["audio"].shape[0] <= 2 for b in batches)  # 2 s each, 4 s budget
    records[2]["audio"] = str(media.corrupt)
    strict = ManifestDataset(records, max_bad_fraction=0.25, min_seen=1)  # judged from 4 seen
    loader = DataLoader(strict, batch_size=6, collate_fn=collate, num_workers=1)
    with pytest.raises(DataError, match="2 of 5 records seen are bad"):  # raised in the worker
        list(loader)


def test_labels_of_another_manifest_or_clustering_are_refused(tmp_path):
    """A labels folder records what it labelled (labels.json): a .km read for other records, or
    a kmeans.pt rewritten by another clustering beside it, is an error (issue 16, item 3)."""
    import json

    from mmssl.data.importers import records_fingerprint

    records = [{"id": "a", "audio": "a.wav"}, {"id": "b", "audio": "b.wav"}]
    manifest, other = tmp_path / "train.jsonl", tmp_path / "other" / "train.jsonl"
    write_manifest(manifest, records)
    other.parent.mkdir()
    write_manifest(other, records[::-1])  # same stem and count, records in another order
    km = tmp_path / "km"
    km.mkdir()
    (km / "train.km").write_text("0 1\n1 1\n")
    torch.save(
        {"centroids": torch.zeros(2, 3), "k": 2, "label_rate": 100.0, "clustering": "c1"}, km / "kmeans.pt"
    )
    entry = {"path": str(manifest), **records_fingerprint(records)}
    record = {"k": 2, "features": "mfcc", "clustering": "c1", "manifests": {"train": entry}}
    (km / "labels.json").write_text(json.dumps(record))
    assert len(ManifestDataset(str(manifest), labels=str(km)).labels) == 2
    assert len(ManifestDataset(str(manifest), labels=str(km / "train.km")).labels) == 2  # the file alone too
    with pytest.raises(DataError, match=r"labels 2 records of .*train.jsonl, not the 2 records of .*other"):
        ManifestDataset(str(other), labels=str(km))
    # a .km the record does not list, and a kmeans.pt of another clustering
    (km / "valid.km").write_text("0 0\n0 1\n")
    write_manifest(tmp_path / "valid.jsonl", records)
    with pytest.raises(DataError, match="valid.km: not made with the clustering"):
        ManifestDataset(str(tmp_path / "valid.jsonl"), labels=str(km))
    torch.save(
        {"centroids": torch.zeros(5, 3), "k": 5, "label_rate": 100.0, "clustering": "c2"}, km / "kmeans.pt"
    )
    with pytest.raises(
        DataError, match=r"kmeans.pt \(k=5\) is not the clustering that made its labels \(k=2\)"
    ):
        ManifestDataset(str(manifest), labels=str(km))
