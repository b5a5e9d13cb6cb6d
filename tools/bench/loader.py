"""Throughput of the training input pipeline alone: does data loading keep the GPU busy?

Builds the batch stream exactly as ``mmssl pretrain`` does (``mmssl.train.build.build_stream``
from a recipe and ``key=value`` overrides): PyAV decoding, lip crops, k-means targets, the
objective's batch hook in the workers (masks), duration-bucketed collation, and pinned memory
when CUDA is there. For each objective and each ``--workers`` count it times one pass over
``--batches`` batches (or one epoch) with no model step, and prints a Markdown table:

* first batch (s): from asking for the first batch to having it (worker start-up included);
* batches/s, utt/s, audio s/s: the steady rate, after the first batch and the ones the
  workers had prefetched meanwhile (timed batches in brackets);
* padding %: padded share of the audio samples;
* loader / step: how many times faster than training the loader is. ``--step-rate S`` compares
  batches/s with S training steps/s on these batches; ``--step-json FILE`` compares audio s/s
  with the ``audio_sec_per_s`` of ``tools/bench/pretrain_step.py`` lines (one per objective).
  Below 1 the GPU waits for data.

With ``--workers 0`` the main process decodes, with torch's intra-op threads: on a busy CPU
small tensor ops then wait for each other (``OMP_NUM_THREADS=1`` helps); data workers run one
thread each.

Objectives that read k-means targets (``data.labels``) get MFCC labels made once with
``mmssl kmeans --features mfcc`` into ``--labels DIR`` unless that folder already has them
(a folder that holds anything else, such as labels of another k, is refused, not rewritten,
unless ``--overwrite``; so is a non-empty ``--out`` file), and ``objective.label_rate``
is set to their rate, 100 Hz (``av_hubert``'s recipe expects
25 Hz labels of an audio-visual layer; its hook does the same work on either).

    mmssl synth --size demo --out corpus
    python tools/bench/loader.py --manifest corpus/av/train.jsonl --labels corpus/km_mfcc \\
        --objectives av_hubert,hubert --workers 0,1,2 --step-rate 2.0
    python tools/bench/loader.py --manifest corpus/av/train.jsonl --labels corpus/km_mfcc \\
        --step-json steps.jsonl --out loader.jsonl model.size=tiny
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from mmssl.config import load_config, resolve
from mmssl.constants import SAMPLE_RATE
from mmssl.data.importers import KMEANS_FILE, kmeans_info
from mmssl.devices import pick_device
from mmssl.errors import ConfigError, MmsslError
from mmssl.files import check_new_file, check_new_folder
from mmssl.registry import OBJECTIVES
from mmssl.runs import build_objective
from mmssl.tables import markdown_table
from mmssl.train.build import build_stream
from mmssl.train.distributed import DistEnv

PREFETCH = 2  # torch DataLoader's default prefetch_factor: batches queued per worker
HEADER = [
    "objective",
    "workers",
    "batches (timed)",
    "first batch (s)",
    "batches/s",
    "utt/s",
    "audio s/s",
    "padding %",
    "loader / step",
    "keeps up",
]


def parse_workers(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``; ``ConfigError`` for anything but non-negative integers."""
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--workers: {text!r} is not a comma list of integers") from None
    if not counts or min(counts) < 0:
        raise ConfigError(f"--workers: {text!r} must list worker counts >= 0")
    return counts


def training_config(
    recipe: str, manifest: str, labels: str | None, overrides: list[str], overwrite: bool = False
) -> DictConfig:
    """The resolved config of ``mmssl pretrain RECIPE data.train=MANIFEST [data.labels=DIR] ...``
    (``overrides`` last). An objective that trains on cluster targets the overrides do not
    provide gets ``labels``, made first when that folder is new (``ensure_labels``)."""
    cfg = load_config(recipe, [f"data.train={manifest}", "data.valid=null", *overrides])
    if needs_labels(cfg):
        if labels is None:
            raise ConfigError(f"recipe {recipe!r} trains on k-means targets: pass --labels DIR")
        default = inspect.signature(OBJECTIVES.get(cfg.objective.name)).parameters["num_classes"].default
        ensure_labels(manifest, labels, int(cfg.objective.get("num_classes", default)), overwrite)
        cfg.data.labels = labels
        if "label_rate" in inspect.signature(OBJECTIVES.get(cfg.objective.name)).parameters:
            cfg.objective.label_rate = kmeans_info(labels)["label_rate"]
    return resolve(cfg)


def needs_labels(cfg: DictConfig) -> bool:
    """Whether the objective trains on cluster targets (its builder takes ``num_classes``, as
    ``tools/bench/pretrain_step.py`` decides) and ``data.labels`` is not set."""
    import mmssl.objectives  # noqa: F401  (registers the objectives)

    params = inspect.signature(OBJECTIVES.get(cfg.objective.name)).parameters
    return "num_classes" in params and OmegaConf.select(cfg, "data.labels") in (None, "???")


def ensure_labels(manifest: str, out: str, k: int, overwrite: bool = False) -> None:
    """MFCC k-means labels of ``manifest`` in ``out`` (``mmssl kmeans``), unless already there
    with the same ``k`` (the dataset then checks they label this manifest). A folder that holds
    anything else (labels of another ``k``: a user's) is never rewritten without ``overwrite``:
    this benchmark once replaced a demo's ``train.km`` and ``kmeans.pt`` with another k while
    its ``valid.km`` stayed (issue 16)."""
    from mmssl.cli import main as mmssl_main

    if (Path(out) / f"{Path(manifest).stem}.km").is_file() and (Path(out) / KMEANS_FILE).is_file():
        found = kmeans_info(out)["k"]
        if found == k:
            return
        if not overwrite:
            raise ConfigError(
                f"--labels {out} holds k={found} labels but the objective wants k={k}: pass a new "
                "--labels folder (or --overwrite to replace that one)"
            )
    check_new_folder(out, overwrite)
    print(f"making MFCC k-means labels (k={k}) of {manifest} in {out}")
    argv = ["kmeans", "--manifest", manifest, "--features", "mfcc", "--k", str(k), "--out", out]
    if mmssl_main(argv + (["--overwrite"] if overwrite else [])) != 0:
        raise ConfigError(f"mmssl kmeans failed on {manifest}")


def measure(cfg: DictConfig, objective: torch.nn.Module, workers: int, batches: int, progress: bool) -> dict:
    """One timed pass over ``batches`` batches (0: one epoch) of the training stream with
    ``workers`` data workers. Rates are steady-state: counted from the batch after those the
    workers had prefetched while the first one was made (``steady_rates``)."""
    cfg.data.num_workers = workers
    stream = build_stream(cfg, "train", objective, DistEnv())  # type: ignore[arg-type]
    if stream is None:
        raise ConfigError("data.train is not set")
    arrivals: list[float] = []
    utts: list[int] = []
    audio_s: list[float] = []
    padded_samples = 0
    keys: list[str] = []
    bar = tqdm(
        total=batches or None,
        desc=f"{cfg.objective.name} workers={workers}",
        unit="batch",
        disable=not progress,
        leave=False,
    )
    start = time.perf_counter()
    for batch in stream.one_epoch():
        arrivals.append(time.perf_counter())
        utts.append(len(batch["ids"]))
        audio_s.append(float(batch["audio_lens"].sum()) / SAMPLE_RATE)
        padded_samples += int(batch["audio"].numel())
        keys = keys or sorted(k for k, v in batch.items() if torch.is_tensor(v))
        bar.update(1)
        if batches and len(arrivals) >= batches:
            break
    bar.close()
    if not arrivals:
        raise ConfigError(f"{cfg.data.train}: the stream gave no batch")
    return {
        "objective": cfg.objective.name,
        "workers": workers,
        "batches": len(arrivals),
        "utterances": sum(utts),
        "audio_seconds": sum(audio_s),
        "first_batch_s": arrivals[0] - start,
        **steady_rates(arrivals, utts, audio_s, workers),
        "padding": 1.0 - sum(audio_s) * SAMPLE_RATE / max(padded_samples, 1),
        "pinned": bool(stream.pin_memory),
        "batch_keys": keys,
    }


def steady_rates(arrivals: list[float], utts: list[int], audio_s: list[float], workers: int) -> dict:
    """Batches, utterances and audio seconds per second between the arrival of batch ``warm - 1``
    and the last one, ``warm = 1 + PREFETCH * workers``: the workers start together and each
    has ``PREFETCH`` batches queued, so the batches up to then arrive in a burst that no worker
    could sustain. Runs too short for that fall back to ``warm = 1``; a single batch gives NaN."""
    warm = 1 + PREFETCH * workers
    if len(arrivals) < warm + 2:
        warm = 1
    span = arrivals[-1] - arrivals[warm - 1]
    if len(arrivals) <= warm or span <= 0:
        return {
            "timed_batches": 0,
            "batches_per_s": math.nan,
            "utt_per_s": math.nan,
            "audio_s_per_s": math.nan,
        }
    return {
        "timed_batches": len(arrivals) - warm,
        "batches_per_s": (len(arrivals) - warm) / span,
        "utt_per_s": sum(utts[warm:]) / span,
        "audio_s_per_s": sum(audio_s[warm:]) / span,
    }


def read_step_json(path: str) -> dict[str, dict]:
    """``tools/bench/pretrain_step.py`` output lines -> objective -> its (last) result."""
    found: dict[str, dict] = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip().startswith("{"):
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}:{number}: not a JSON line ({err})") from None
        if "objective" in doc and "audio_sec_per_s" in doc:
            found[doc["objective"]] = doc
    return found


def add_ratio(result: dict, step_rate: float | None, steps: dict[str, dict]) -> dict:
    """``ratio``: loader rate over training rate, in batches (``step_rate``) or in audio
    seconds (a ``pretrain_step.py`` result for the objective); None when neither is known."""
    ratio = None
    if result["objective"] in steps:
        result["step_audio_s_per_s"] = float(steps[result["objective"]]["audio_sec_per_s"])
        ratio = result["audio_s_per_s"] / result["step_audio_s_per_s"]
    elif step_rate:
        result["step_rate"] = step_rate
        ratio = result["batches_per_s"] / step_rate
    result["ratio"] = ratio
    result["keeps_up"] = None if ratio is None or math.isnan(ratio) else bool(ratio >= 1.0)
    return result


def step_table(steps: dict[str, dict]) -> str:
    """The ``pretrain_step.py`` results compared against, one row per objective."""
    header = ["objective", "size", "device", "batch", "steps/s", "audio s/s", "MFU", "peak GB"]
    rows = [
        [
            name,
            r.get("size"),
            r.get("device"),
            f"{r.get('batch_size')} x {r.get('seconds')} s",
            r.get("steps_per_s"),
            r.get("audio_sec_per_s"),
            r.get("mfu"),
            r.get("peak_mem_gb"),
        ]
        for name, r in steps.items()
    ]
    return markdown_table(header, rows, digits=3)


def table(results: list[dict]) -> str:
    rows = []
    for r in results:
        keeps = {True: "yes", False: "no", None: ""}[r["keeps_up"]]
        rows.append(
            [
                r["objective"],
                r["workers"],
                f"{r['batches']} ({r['timed_batches']})",
                r["first_batch_s"],
                r["batches_per_s"],
                r["utt_per_s"],
                r["audio_s_per_s"],
                100.0 * r["padding"],
                r["ratio"],
                keeps,
            ]
        )
    return markdown_table(HEADER, rows)


def machine() -> str:
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA"
    return (
        f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads, {cuda}, "
        f"torch {torch.__version__}"
    )


def run(args: argparse.Namespace) -> list[dict]:
    """Every (objective, worker count) measurement of the command line, in that order."""
    if not Path(args.manifest).is_file():
        raise ConfigError(f"--manifest {args.manifest} not found")
    if args.batches < 0:
        raise ConfigError(f"--batches must be >= 0; got {args.batches}")
    workers = parse_workers(args.workers)
    steps = read_step_json(args.step_json) if args.step_json else {}
    results = []
    for recipe in [name.strip() for name in args.objectives.split(",") if name.strip()]:
        cfg = training_config(recipe, args.manifest, args.labels, list(args.overrides), args.overwrite)
        torch.manual_seed(cfg.train.seed)
        # as ``build_trainer``: the objective is on its device before the stream takes its batch
        # hook; built once, outside the timing
        objective = build_objective(cfg).to(pick_device(cfg.train.device, option="train.device"))
        for count in workers:
            results.append(
                add_ratio(measure(cfg, objective, count, args.batches, not args.quiet), args.step_rate, steps)
            )
            if args.out:  # each row as soon as it is measured: a run cut short keeps what it had
                with open(args.out, "a") as f:
                    f.write(json.dumps(results[-1]) + "\n")
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", required=True, help="training manifest (e.g. CORPUS/av/train.jsonl)")
    p.add_argument(
        "--objectives", default="av_hubert,hubert", help="comma list of recipes (default av_hubert,hubert)"
    )
    p.add_argument("--workers", default="0,1,2", help="comma list of data worker counts (default 0,1,2)")
    p.add_argument(
        "--batches", type=int, default=30, help="batches per measurement; 0: one epoch (default 30)"
    )
    p.add_argument(
        "--labels",
        help="k-means labels folder for recipes that need data.labels "
        "(made with MFCC k-means when it lacks them)",
    )
    rate = p.add_mutually_exclusive_group()
    rate.add_argument("--step-rate", type=float, help="training steps/s on these batches, to compare with")
    rate.add_argument(
        "--step-json", help="tools/bench/pretrain_step.py output (JSON lines), to compare audio s/s"
    )
    p.add_argument("--out", help="also write the results here as JSON lines, each as it is measured")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty --out file or a --labels folder of another k",
    )
    p.add_argument(
        "overrides", nargs="*", help="key=value config overrides for every recipe (e.g. model.size=tiny)"
    )
    args = p.parse_args(argv)

    try:
        if args.out:
            check_new_file(args.out, args.overwrite)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text("")
        results = run(args)
    except MmsslError as err:
        print(f"loader: {err}", file=sys.stderr)
        return 2
    if args.step_json:
        print(f"training step (tools/bench/pretrain_step.py, {args.step_json})\n")
        print(step_table(read_step_json(args.step_json)) + "\n")
    print(f"loader throughput on {args.manifest} ({machine()})\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
