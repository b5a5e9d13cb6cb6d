"""``tools/bench/gpu_session.sh --cpu-smoke``: the GPU session's steps, small, on the CPU."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_cpu_smoke_writes_every_result_and_compares_loader_with_steps(synth_tiny, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            "bash",
            str(ROOT / "tools" / "bench" / "gpu_session.sh"),
            "--cpu-smoke",
            "--corpus",
            str(synth_tiny),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # what the device tool brings back: at most 8 plain files, named in letters, digits, . _ -
    files = sorted(p.name for p in out.iterdir())
    assert files == [
        "loader.jsonl",
        "loader.log",
        "prep.log",
        "pytest_cuda.log",
        "steps.jsonl",
        "steps.log",
        "summary.md",
    ]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", name) for name in files)
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert [(s["objective"], s["size"], s["device"]) for s in steps] == [
        ("hubert", "tiny", "cpu"),
        ("av_hubert", "tiny", "cpu"),
    ]
    assert all(s["steps_per_s"] > 0 and s["audio_sec_per_s"] > 0 for s in steps)
    step_audio = {s["objective"]: s["audio_sec_per_s"] for s in steps}
    loads = [json.loads(line) for line in (out / "loader.jsonl").read_text().splitlines()]
    assert [(r["objective"], r["workers"], r["batches"]) for r in loads] == [
        ("av_hubert", 1, 3),
        ("hubert", 1, 3),
    ]
    for r in loads:
        assert r["ratio"] == pytest.approx(r["audio_s_per_s"] / step_audio[r["objective"]])
        assert "targets" in r["batch_keys"]
    assert "wrote" in (out / "prep.log").read_text() and "train.km" in (out / "prep.log").read_text()
    summary = (out / "summary.md").read_text()
    assert "| hubert | tiny | cpu | 2 x 2.0 s |" in summary and "| av_hubert | 1 | 3 (" in summary
    assert "objectives timed: 2, failed: 0" in summary and done.stdout.strip() == summary.strip()
