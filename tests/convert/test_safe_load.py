"""Pickled checkpoints are read with an allow-list: a file whose unpickling would run code is
refused, naming the global it needs, and nothing of it runs."""

from __future__ import annotations

import argparse
import os
import pickle

import pytest
import torch

from mmssl import cli
from mmssl.convert.safe_load import UnsafeCheckpointError, load_pickle


class _Touch:
    """Unpickling this calls ``os.system`` (it would create ``path``)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


class _Write:
    """Unpickling this calls ``exec`` on code that writes a file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (exec, (f"open({str(self.path)!r}, 'w').write('ran')",))


@pytest.mark.parametrize("payload", [_Touch, _Write])
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_a_pickle_that_runs_code_is_refused_and_nothing_runs(payload, writer, tmp_path):
    marker = tmp_path / "ran"
    # a raw pickle of tensors needs torch.storage._load_from_bytes, itself refused: no tensors there
    checkpoint = {"model": {"w": torch.zeros(2)} if writer == "torch.save" else {}, "cfg": payload(marker)}
    file = tmp_path / "evil.pt"
    if writer == "torch.save":
        torch.save(checkpoint, file)
    else:
        file.write_bytes(pickle.dumps(checkpoint, protocol=2))
    with pytest.raises(
        UnsafeCheckpointError,
        match=r"evil.pt: refused: unpickling it needs (posix\.system|(builtins\.)?exec)",
    ):
        load_pickle(file)
    assert not marker.exists()


def test_the_command_refuses_it_in_one_line(tmp_path, capsys):
    marker = tmp_path / "ran"
    torch.save({"model": {}, "cfg": _Touch(marker)}, tmp_path / "evil.pt")
    assert cli.main(["convert", str(tmp_path / "evil.pt"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refused" in err[0] and "system" in err[0]
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_allowed_classes_load(tmp_path):
    from omegaconf import OmegaConf

    data = {
        "args": argparse.Namespace(arch="hubert", layers=[1, 2]),
        "cfg": OmegaConf.create({"model": {"x": 1.5}}),
    }
    torch.save(data, tmp_path / "ok.pt")
    loaded = load_pickle(tmp_path / "ok.pt")
    assert loaded["args"].layers == [1, 2] and loaded["cfg"].model.x == 1.5
