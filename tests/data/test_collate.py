import pytest
import torch

from mmssl.data.collate import IGNORE_INDEX, collate
from mmssl.errors import DataError


def _item(i, s, t):
    return {
        "id": f"u{i}",
        "audio": torch.full((s,), float(i + 1)),
        "video": torch.full((t, 1, 88, 88), float(i + 1)),
        "targets": torch.full((t,), i, dtype=torch.long),
        "text": torch.arange(1, i + 3),
        "transcript": f"words {i}",
    }


def test_pads_each_modality_with_lengths():
    batch = collate([_item(0, 5, 3), None, _item(1, 8, 2)])
    assert batch["ids"] == ["u0", "u1"] and batch["transcript"] == ["words 0", "words 1"]
    assert batch["audio"].shape == (2, 8) and batch["audio_lens"].tolist() == [5, 8]
    assert batch["audio"][0].tolist() == [1.0] * 5 + [0.0] * 3
    assert batch["video"].shape == (2, 3, 1, 88, 88) and batch["video_lens"].tolist() == [3, 2]
    assert (batch["video"][1, 2] == 0).all() and (batch["video"][1, :2] == 2).all()
    assert batch["targets"].tolist() == [[0, 0, 0], [1, 1, IGNORE_INDEX]]
    assert batch["target_lens"].tolist() == [3, 2]
    assert batch["text"].tolist() == [[1, 2, 0], [1, 2, 3]] and batch["text_lens"].tolist() == [2, 3]
    assert batch["audio_lens"].dtype == torch.long


def test_absent_modalities_are_absent_keys():
    batch = collate([{"id": "a", "audio": torch.ones(4)}, {"id": "b", "audio": torch.ones(2)}])
    assert set(batch) == {"ids", "audio", "audio_lens"}


def test_images_stack_and_sizes_must_match():
    imgs = [{"id": str(i), "image": torch.rand(3, 8, 8)} for i in range(3)]
    batch = collate(imgs)
    torch.testing.assert_close(batch["image"][2], imgs[2]["image"])
    imgs[1]["image"] = torch.rand(3, 9, 8)
    with pytest.raises(DataError, match="different sizes"):
        collate(imgs)


def test_all_skipped_gives_empty_batch():
    assert collate([None, None]) == {"ids": []}
