"""``tools/bench/search.py`` and ``tools/bench/serve_load.py`` on tiny sizes: every row, and a
load test that stops by itself with no error."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "tools" / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_search_bench_rows_for_each_kind(tmp_path, capsys):
    out = tmp_path / "search.jsonl"
    argv = ["--sizes", "2000", "--dim", "16", "--queries", "20", "--clusters", "20", "--out", str(out)]
    assert _load("search").main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["exact", "hnsw", "ivf"]
    assert rows[0]["recall_at_k"] == 1.0 and all(r["p95_ms"] >= r["p50_ms"] > 0 for r in rows)
    assert "| 2,000 | hnsw |" in capsys.readouterr().out


def test_load_test_is_bounded_and_counts_every_request(synth_tiny, tmp_path):
    argv = ["--work", str(tmp_path), "--corpus", str(synth_tiny), "--size", "tiny", "--images", "50"]
    argv += ["--clients", "2", "--seconds", "2", "--max-requests", "12", "--bad-every", "3"]
    summary = _load("serve_load").main(argv)
    assert summary["requests"] == 12 and summary["errors"] == 0
    statuses = summary["statuses"]  # which client sends which request depends on timing
    assert set(statuses) == {"good 200", "bad 422"} and sum(statuses.values()) == 12
    assert summary["p99_ms"] >= summary["p50_ms"] > 0
