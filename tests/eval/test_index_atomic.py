"""``mmssl index`` replaces its folder whole, so a killed re-index leaves the previous index, and
``mmssl retrieve`` refuses an index whose files do not agree with its ``index.json``."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mmssl.cli import main

ROOT = Path(__file__).resolve().parents[2]

# `mmssl index` that dies by SIGKILL half-way through writing the new index's files
KILLED = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    from mmssl.eval import retrieval
    real = retrieval._write_jsonl
    def dying(path, rows):
        real(path, rows)
        if path.name == "speech.jsonl":  # the new embeddings are written, index.json is not
            os.kill(os.getpid(), signal.SIGKILL)
    retrieval._write_jsonl = dying
    from mmssl.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def two_manifests(speech_image_run, tmp_path_factory):
    run, manifest = speech_image_run
    lines = manifest.read_text().splitlines()
    small = tmp_path_factory.mktemp("index_atomic") / "small.jsonl"
    small.write_text("\n".join(lines[:4]) + "\n")  # 2 images of the 4
    return run, manifest, small


def _index(run, manifest, out) -> int:
    return main(["index", "--run", str(run), "--manifest", str(manifest), "--out", str(out), "--quiet"])


def test_a_killed_reindex_leaves_the_old_index_whole_and_retrieve_trusts_it(two_manifests, tmp_path, capsys):
    run, manifest, small = two_manifests
    out = tmp_path / "index"
    assert _index(run, small, out) == 0
    before = _files(out)
    script = tmp_path / "killed_index.py"
    script.write_text(KILLED)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    args = [sys.executable, str(script), "index", "--run", str(run), "--manifest", str(manifest)]
    with open(tmp_path / "log.txt", "w") as log:
        done = subprocess.run(
            [*args, "--out", str(out), "--quiet"], env=env, stdout=log, stderr=subprocess.STDOUT, timeout=300
        )
    assert done.returncode == -9, (tmp_path / "log.txt").read_text()
    assert _files(out) == before  # the old index, every file of it
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(".index.")]
    assert len(left) == 1 and left[0].endswith("dir-new")
    capsys.readouterr()
    assert main(["retrieve", "--index", str(out), "--manifest", str(small), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 4
    # the next index clears the leftover and replaces the folder with the whole new index
    assert _index(run, manifest, out) == 0
    assert "removing" in capsys.readouterr().err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".index.")]
    assert json.loads((out / "index.json").read_text())["images"] == 4


def test_retrieve_refuses_an_index_that_mixes_two(two_manifests, tmp_path, capsys):
    run, manifest, small = two_manifests
    old, new = tmp_path / "old", tmp_path / "new"
    assert _index(run, small, old) == 0 and _index(run, manifest, new) == 0
    (old / "images.safetensors").write_bytes((new / "images.safetensors").read_bytes())
    capsys.readouterr()
    assert main(["retrieve", "--index", str(old), "--manifest", str(small)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "images.safetensors: not the file index.json" in err
    # an index made before the checksums were recorded is still checked by its counts
    meta = json.loads((new / "index.json").read_text())
    del meta["files"]
    meta["images"] = 3
    (new / "index.json").write_text(json.dumps(meta))
    assert main(["retrieve", "--index", str(new), "--manifest", str(small)]) == 2
    assert "index.json says 3 images" in capsys.readouterr().err


def test_index_will_not_replace_a_folder_that_is_not_an_index(two_manifests, tmp_path, capsys):
    run, _, small = two_manifests
    (tmp_path / "notes.txt").write_text("mine")
    assert _index(run, small, tmp_path) == 2
    assert "is not a folder this command wrote (no index.json)" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
