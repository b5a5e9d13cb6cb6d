import random

import numpy as np
import pytest
import torch

from mmssl import runs
from mmssl.errors import DataError
from mmssl.train import checkpoint as ckpt


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
        folder = ckpt_dir / runs.step_dir_name(step)
        folder.mkdir(parents=True)
        runs.save_weights({"w": torch.full((2,), float(step))}, folder / runs.MODEL_FILE)
        ckpt.save_state({"step": step}, folder / runs.STATE_FILE)
        ckpt.write_latest(ckpt_dir, folder.name)
    ckpt.prune(ckpt_dir, keep_last=2)
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["latest", "step_00000002", "step_00000003"]
    assert torch.equal(runs.load_weights(tmp_path)["w"], torch.full((2,), 3.0))
    assert torch.equal(runs.load_weights(ckpt_dir / "step_00000002")["w"], torch.full((2,), 2.0))
    (ckpt_dir / "latest").write_text("step_00000009\n")
    with pytest.raises(DataError, match="not a complete checkpoint"):
        runs.load_weights(tmp_path)


def test_state_refuses_pickled_objects(tmp_path):
    from fractions import Fraction  # any class outside weights_only's allow-list

    torch.save({"x": Fraction(1, 3)}, tmp_path / "evil.pt")
    with pytest.raises(DataError, match="evil.pt"):
        ckpt.load_state(tmp_path / "evil.pt")
