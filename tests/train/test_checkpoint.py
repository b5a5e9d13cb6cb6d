import random

import numpy as np
import pytest
import torch

from mmssl.errors import DataError
from mmssl.train import checkpoint as ckpt


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "state.pt"
    ckpt.save_state({"step": 1}, path)

    def broken(f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        ckpt.atomic_write(path, broken)
    assert ckpt.load_state(path) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]  # no temporary left behind


def test_rng_round_trip_through_weights_only_load(tmp_path):
    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    ckpt.save_state(ckpt.capture_rng(), tmp_path / "rng.pt")
    expected = (torch.rand(3), random.random(), np.random.rand(2))
    torch.manual_seed(9), random.seed(9), np.random.seed(9)
    ckpt.restore_rng(ckpt.load_state(tmp_path / "rng.pt"))
    got = (torch.rand(3), random.random(), np.random.rand(2))
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1]
    np.testing.assert_array_equal(got[2], expected[2])


def test_weights_resolve_from_run_folder_latest_and_prune(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        folder = ckpt_dir / ckpt.step_dir_name(step)
        folder.mkdir(parents=True)
        ckpt.save_weights({"w": torch.full((2,), float(step))}, folder / ckpt.MODEL_FILE)
        ckpt.save_state({"step": step}, folder / ckpt.STATE_FILE)
        ckpt.write_latest(ckpt_dir, folder.name)
    ckpt.prune(ckpt_dir, keep_last=2)
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["latest", "step_00000002", "step_00000003"]
    assert torch.equal(ckpt.load_weights(tmp_path)["w"], torch.full((2,), 3.0))
    assert torch.equal(ckpt.load_weights(ckpt_dir / "step_00000002")["w"], torch.full((2,), 2.0))
    (ckpt_dir / "latest").write_text("step_00000009\n")
    with pytest.raises(DataError, match="not a complete checkpoint"):
        ckpt.load_weights(tmp_path)


def test_state_refuses_pickled_objects(tmp_path):
    from fractions import Fraction  # any class outside weights_only's allow-list

    torch.save({"x": Fraction(1, 3)}, tmp_path / "evil.pt")
    with pytest.raises(DataError, match="evil.pt"):
        ckpt.load_state(tmp_path / "evil.pt")


def test_tied_weights_are_saved(tmp_path):
    w = torch.randn(3, 2)
    ckpt.save_weights({"a": w, "b": w}, tmp_path / "m.safetensors")
    loaded = ckpt.load_weights(tmp_path / "m.safetensors")
    assert torch.equal(loaded["a"], w) and torch.equal(loaded["b"], w)
