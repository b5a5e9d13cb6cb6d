"""``tools/bench/loader.py`` on the built-in tiny corpus: what it counts is what the training
stream gives, and its comparison with a training step rate is the stated ratio."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from mmssl.data.manifest import read_manifest

ROOT = Path(__file__).resolve().parents[2]
KEYS = ["model.size=tiny", "data.max_seconds_per_batch=8", "objective.num_classes=8"]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "tools" / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


loader = _load("loader")


@pytest.fixture(scope="module")
def bench(synth_tiny, tmp_path_factory):
    """One run over a whole epoch: both objectives, 0 and 1 workers, 2 training steps/s."""
    folder = tmp_path_factory.mktemp("loader_bench")
    manifest, labels, out = synth_tiny / "av" / "train.jsonl", folder / "km", folder / "loader.jsonl"
    argv = [
        "--manifest",
        manifest,
        "--labels",
        labels,
        "--workers",
        "0,1",
        "--batches",
        "0",
        "--step-rate",
        "2",
        "--out",
        out,
        "--quiet",
        *KEYS,
    ]
    rc = loader.main([str(a) for a in argv])
    results = [json.loads(line) for line in out.read_text().splitlines()]
    return rc, manifest, labels, results


def test_one_epoch_counts_every_kept_record_for_each_worker_count(bench, capsys):
    rc, manifest, labels, results = bench
    assert rc == 0
    assert [(r["objective"], r["workers"]) for r in results] == [
        ("av_hubert", 0),
        ("av_hubert", 1),
        ("hubert", 0),
        ("hubert", 1),
    ]
    kept = [r for r in read_manifest(manifest) if 0.5 <= r["audio_samples"] / 16_000 <= 15.0]  # the defaults
    for r in results:
        assert r["utterances"] == len(kept)
        assert r["audio_seconds"] == pytest.approx(sum(k["audio_samples"] for k in kept) / 16_000)
        assert r["batches"] >= math.ceil(r["audio_seconds"] / 8)  # no batch over data.max_seconds_per_batch
        assert 0.0 <= r["padding"] < 1.0 and r["first_batch_s"] > 0 and r["pinned"] is False
    # the batches are the training ones: k-means targets from --labels, and each hook's masks
    lines = (labels / "train.km").read_text().splitlines()
    assert len(lines) == len(read_manifest(manifest))
    assert torch.load(labels / "kmeans.pt", weights_only=True)["k"] == 8
    assert {"targets", "video", "audio_mask", "video_mask"} <= set(results[0]["batch_keys"])
    assert {"targets", "pred_mask"} <= set(results[2]["batch_keys"]) and "video" not in results[2][
        "batch_keys"
    ]


def test_ratio_is_loader_batches_over_training_steps(bench):
    _, _, _, results = bench
    for r in results:
        assert r["timed_batches"] >= 1
        assert r["ratio"] == pytest.approx(r["batches_per_s"] / 2.0)
        assert r["keeps_up"] == (r["ratio"] >= 1.0)
        assert r["audio_s_per_s"] / r["batches_per_s"] <= 8.0 + 1e-9  # mean audio of a timed batch


def test_steady_rates_skip_the_prefetched_burst():
    # 2 workers queue 2 batches each: the first 5 arrive in a burst, then one every 0.5 s
    arrivals = [10.0, 10.01, 10.02, 10.03, 10.04, 10.54, 11.04, 11.54]
    rates = loader.steady_rates(arrivals, [2] * 8, [3.0] * 8, workers=2)
    assert rates["timed_batches"] == 3
    assert rates["batches_per_s"] == pytest.approx(2.0) and rates["utt_per_s"] == pytest.approx(4.0)
    assert rates["audio_s_per_s"] == pytest.approx(6.0)
    short = loader.steady_rates(arrivals[:4], [1] * 4, [1.0] * 4, workers=2)  # too short: after the first
    assert short["timed_batches"] == 3 and short["batches_per_s"] == pytest.approx(3 / 0.03)
    assert math.isnan(loader.steady_rates([1.0], [1], [1.0], workers=0)["batches_per_s"])


def test_step_json_compares_audio_seconds_and_labels_are_reused(bench, tmp_path, capsys):
    _, manifest, labels, _ = bench
    steps = tmp_path / "steps.jsonl"
    steps.write_text(
        "warming up\n"
        + json.dumps(
            {
                "objective": "hubert",
                "size": "base",
                "steps_per_s": 3.0,
                "audio_sec_per_s": 50.0,
                "batch_size": 8,
                "seconds": 15,
            }
        )
        + "\n"
    )
    made = (labels / "kmeans.pt").stat().st_mtime_ns
    out = tmp_path / "r.jsonl"
    argv = [
        "--manifest",
        manifest,
        "--labels",
        labels,
        "--objectives",
        "hubert",
        "--workers",
        "0",
        "--batches",
        "3",
        "--step-json",
        steps,
        "--out",
        out,
        "--quiet",
        *KEYS,
    ]
    assert loader.main([str(a) for a in argv]) == 0
    (r,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert r["batches"] == 3 and r["step_audio_s_per_s"] == 50.0
    assert r["ratio"] == pytest.approx(r["audio_s_per_s"] / 50.0)
    assert (labels / "kmeans.pt").stat().st_mtime_ns == made  # the labels were there: not made again
    printed = capsys.readouterr().out
    assert "| hubert | base |" in printed and f"| hubert | 0 | 3 ({r['timed_batches']}) |" in printed


def test_bad_input_is_a_clear_error(synth_tiny, tmp_path, capsys):
    manifest = str(synth_tiny / "av" / "train.jsonl")
    assert loader.main(["--manifest", str(tmp_path / "none.jsonl"), "--quiet"]) == 2
    assert "none.jsonl not found" in capsys.readouterr().err
    assert loader.main(["--manifest", manifest, "--workers", "1,x", "--quiet"]) == 2
    assert "--workers" in capsys.readouterr().err
    assert loader.main(["--manifest", manifest, "--objectives", "hubert", "--quiet", "model.size=tiny"]) == 2
    assert "'hubert' trains on k-means targets: pass --labels" in capsys.readouterr().err


def test_a_users_labels_and_results_are_never_rewritten(tmp_path, capsys):
    """Issue 16, item 3: ``--labels`` holding another k's labels (a demo's) is refused and left
    as it was, and so is a folder of anything else or a non-empty ``--out`` file."""
    from mmssl.errors import ConfigError

    manifest = tmp_path / "train.jsonl"
    manifest.write_text('{"id": "a", "audio": "a.wav"}\n')
    km = tmp_path / "km_mfcc"
    km.mkdir()
    (km / "train.km").write_text("0 1 1\n")
    (km / "valid.km").write_text("2 2\n")
    torch.save({"centroids": torch.zeros(50, 39), "k": 50, "label_rate": 100.0}, km / "kmeans.pt")
    before = {p.name: p.read_bytes() for p in km.iterdir()}
    with pytest.raises(ConfigError, match=r"holds k=50 labels but the objective wants k=100.*--overwrite"):
        loader.ensure_labels(str(manifest), str(km), 100)
    assert {p.name: p.read_bytes() for p in km.iterdir()} == before
    loader.ensure_labels(str(manifest), str(km), 50)  # the same k: used as it is
    assert {p.name: p.read_bytes() for p in km.iterdir()} == before
    other = tmp_path / "notes"
    other.mkdir()
    (other / "README").write_text("mine")
    with pytest.raises(ConfigError, match="not empty: pass --overwrite"):
        loader.ensure_labels(str(manifest), str(other), 8)
    out = tmp_path / "results.jsonl"
    out.write_text('{"kept": true}\n')
    assert loader.main(["--manifest", str(manifest), "--out", str(out), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_text() == '{"kept": true}\n'
