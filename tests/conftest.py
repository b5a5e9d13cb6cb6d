import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def synth_tiny(tmp_path_factory):
    """A tiny generated corpus (``mmssl synth --size tiny``), made once per test session:
    ``av/``, ``image/`` and ``noise/`` under the returned folder."""
    from mmssl.data.synth import config_for, generate

    out = tmp_path_factory.mktemp("synth_tiny")
    generate(config_for("tiny"), out, workers=1, progress=False)
    return out


@pytest.fixture(scope="session")
def speech_image_run(synth_tiny, tmp_path_factory):
    """A ``speech_image`` run trained with ``mmssl pretrain`` until it memorises two spoken
    captions of each of ``synth_tiny``'s four training images (``pairs.jsonl``, 8 records):
    returns ``(run folder, manifest)``. Tiny towers, filterbank speech encoder, about 10 s."""
    import json

    from mmssl.cli import main
    from mmssl.data.manifest import read_manifest

    out = tmp_path_factory.mktemp("speech_image")
    records = read_manifest(synth_tiny / "image" / "train.jsonl")  # absolute media paths
    manifest = out / "pairs.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records if r["id"].endswith(("_0", "_1"))))
    run = out / "run"
    code = main(
        [
            "pretrain",
            "speech_image",
            f"data.train={manifest}",
            "model.size=tiny",
            "objective.speech=fbank",
            "train.max_steps=30",
            "train.lr=3e-3",
            "train.warmup_fraction=0.1",
            "train.save_every=30",
            "train.valid_every=0",
            "train.progress=false",
            "data.num_workers=0",
            f"train.out_dir={run}",
        ]
    )
    assert code == 0
    return run, manifest


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
