import pytest

from mmssl.cli import main


@pytest.fixture(scope="session")
def served_index(speech_image_run, tmp_path_factory):
    """An index of ``speech_image_run``'s 8 memorised captions of 4 images:
    ``(index folder, manifest)``."""
    run, manifest = speech_image_run
    out = tmp_path_factory.mktemp("serve") / "index"
    assert main(["index", "--run", str(run), "--manifest", str(manifest), "--out", str(out), "--quiet"]) == 0
    return out, manifest
