"""``tools/bench/kmeans.py`` on a tiny mixture: every library's row, inertias computed alike."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("bench_kmeans", ROOT / "tools" / "bench" / "kmeans.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_run_rows_for_ours_faiss_and_scikit_learn(tmp_path, capsys):
    pytest.importorskip("faiss")
    pytest.importorskip("sklearn")
    bench = _load()
    out = tmp_path / "km.jsonl"
    argv = ["--sizes", "3000", "--dims", "4", "--k", "8", "--iters", "5", "--repeats", "1", "--out", str(out)]
    argv += ["--paired-seeds", "2"]
    assert bench.main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["method"] for r in rows] == [
        "ours (sklearn Lloyd)",
        "ours (faiss Lloyd)",
        "ours (torch Lloyd)",
        "faiss (random init, all points)",
        "scikit-learn k-means++",
        "ours, fit on 0.1 of the points",
    ]
    # our engines start from the same seeds and take the same steps
    assert rows[0]["inertia"] == pytest.approx(rows[1]["inertia"], rel=1e-4)
    assert rows[0]["inertia"] == pytest.approx(rows[2]["inertia"], rel=1e-4)
    assert all(r["n"] == 3000 and r["dim"] == 4 and r["inertia"] > 0 for r in rows)
    pair = rows[0]["paired_seeds"]  # the two k-means++ seedings, each followed by the same Lloyd
    assert pair["seeds"] == 2 and 0 <= pair["ours_lower"] <= 2
    assert pair["min"] <= pair["mean"] <= pair["max"] and 0.8 < pair["mean"] < 1.25
    assert "| 3,000 | 4 | ours (sklearn Lloyd) |" in capsys.readouterr().out
    assert bench.main(argv) == 2  # an existing --out is not wiped
    assert len(out.read_text().splitlines()) == 6
