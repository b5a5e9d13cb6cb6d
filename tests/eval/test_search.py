"""Image search with FAISS (``mmssl.eval.search``) and ``mmssl index --faiss``."""

import json

import numpy as np
import pytest
import torch

from mmssl.cli import main
from mmssl.errors import ConfigError, DataError
from mmssl.eval.search import (
    EXACT_UP_TO,
    FAISS_FILE,
    ImageSearch,
    build_faiss,
    choose_kind,
    recall_against_exact,
    write_faiss,
)


def _unit(n: int, dim: int = 32, seed: int = 0) -> torch.Tensor:
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.normalize(x, dim=1)


def test_auto_is_exact_for_small_collections_and_hnsw_for_large():
    assert choose_kind("auto", 10) == "exact" and choose_kind("auto", EXACT_UP_TO) == "hnsw"
    assert choose_kind("ivf", 10) == "ivf"
    with pytest.raises(ConfigError, match="--faiss"):
        choose_kind("lsh", 10)


def test_exact_search_is_the_matrix_product():
    images, queries = _unit(300), _unit(5, seed=1)
    scores, rows = ImageSearch.open(images).search(queries, 7)
    truth = (queries @ images.T).topk(7, dim=1)
    np.testing.assert_array_equal(rows, truth.indices.numpy())
    np.testing.assert_allclose(scores, truth.values.numpy(), atol=1e-5)
    assert ImageSearch.open(images).search(queries, 1000)[1].shape == (5, 300)  # k capped at N


@pytest.mark.parametrize("kind, least", [("hnsw", 0.9), ("ivf", 0.8)])
def test_approximate_kinds_find_most_of_the_exact_top_10(kind, least):
    # uniform random directions: the hardest case for both (no clusters to find)
    images = _unit(4000)
    queries = torch.nn.functional.normalize(images[:200] + 0.3 * _unit(200, seed=2), dim=1)
    index = build_faiss(images, kind)
    assert recall_against_exact(index, images, queries) > least
    assert recall_against_exact(build_faiss(images, "exact"), images, queries) == 1.0


def test_a_faiss_file_of_other_embeddings_is_refused(tmp_path):
    write_faiss(build_faiss(_unit(50), "hnsw"), tmp_path / FAISS_FILE)
    assert ImageSearch.open(_unit(50), tmp_path).kind == "hnsw"
    with pytest.raises(DataError, match="holds 50 vectors"):
        ImageSearch.open(_unit(60), tmp_path)


def test_index_builds_the_faiss_kind_asked_for_and_reports_its_recall(speech_image_run, tmp_path, capsys):
    run, manifest = speech_image_run
    out = tmp_path / "index"
    argv = ["index", "--run", str(run), "--manifest", str(manifest), "--quiet", "--out", str(out)]
    assert main([*argv, "--faiss", "hnsw"]) == 0
    assert "image search: hnsw (FAISS), recall@10 against exact search 100.0 %" in capsys.readouterr().out
    meta = json.loads((out / "index.json").read_text())
    assert meta["search"] == {"kind": "hnsw", "recall_at_10_vs_exact": 1.0} and FAISS_FILE in meta["files"]
    assert ImageSearch.open(torch.zeros(4, meta["dim"]), out).kind == "hnsw"
    # retrieve searches with it: the same ranking as exact search on 4 images
    capsys.readouterr()
    assert main(["retrieve", "--index", str(out), "--manifest", str(manifest), "--json", "--top", "4"]) == 0
    approximate = json.loads(capsys.readouterr().out)
    (out / FAISS_FILE).rename(tmp_path / "aside.faiss")
    assert main(["retrieve", "--index", str(out), "--manifest", str(manifest), "--json", "--top", "4"]) == 0
    exact = json.loads(capsys.readouterr().out)
    assert [[h["group"] for h in r["results"]] for r in approximate] == [
        [h["group"] for h in r["results"]] for r in exact
    ]
    (tmp_path / "aside.faiss").rename(out / FAISS_FILE)
    # retrieve checks the FAISS file's checksum like the embeddings'
    (out / FAISS_FILE).write_bytes((out / FAISS_FILE).read_bytes() + b"x")
    assert main(["retrieve", "--index", str(out), "--manifest", str(manifest)]) == 2
    assert f"{FAISS_FILE}: not the file index.json describes" in capsys.readouterr().err
    assert main([*argv, "--faiss", "exact"]) == 0  # no FAISS file for exact search
    assert not (out / FAISS_FILE).exists()
    assert json.loads((out / "index.json").read_text())["search"]["kind"] == "exact"
