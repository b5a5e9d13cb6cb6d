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


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
