"""``mmssl demo``: the main job end to end on the built-in generated corpus.

Generate the corpus, check it, cluster MFCC frames into iteration-1 targets, pretrain
AV-HuBERT's first iteration on audio and lip video (recipe ``av_hubert_iter1``: feature
masking, no modality dropout), then cluster the pretrained model's last audio-visual layer on
the validation split and compare both clusterings against the corpus's phone alignments
(phone purity, cluster purity, PNMI, as in the HuBERT paper). Iteration-2 targets for the
whole training set are the same ``mmssl kmeans`` command over ``train.jsonl``, and the later
iterations pretrain with recipe ``av_hubert`` (input masking, modality dropout). Then
fine-tune the pretrained model for ASR with CTC (character units) and measure its WER on the
test split under babble and music noise at several SNRs, from audio alone, video alone and
both. Each stage is an ordinary ``mmssl`` command,
printed before it runs so it can be repeated by hand. A stage whose output exists is
skipped, so an interrupted demo continues where it stopped (pretraining resumes). The ASR
stages depend on their inputs: a fine-tuning run that started from another pretraining
checkpoint than the latest (``demo --steps 40`` after a finished 30-step demo) is removed and
redone, and so is the noisy evaluation of another fine-tuning checkpoint.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from mmssl import cli
from mmssl.config import CONFIG_FILE
from mmssl.data.importers import KMEANS_FILE, read_kmeans_state
from mmssl.errors import MmsslError
from mmssl.eval.noisy import read_results
from mmssl.runs import MODEL_FILE, latest_checkpoint, step_dir_name

CLUSTERS = 50
# the noisy evaluation grid of the demo (AV-HuBERT reports babble, music, natural and speech
# noise at -10..10 dB; the built-in corpus has babble, music, pink and white noise)
NOISE_TYPES = "babble,music"
SNRS = "clean,10,0,-5"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=Path, default=Path("runs/demo"), help="folder for the corpus and the runs"
    )
    parser.add_argument(
        "--size", default="demo", choices=["tiny", "demo"], help="built-in corpus size (default demo)"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="pretraining steps (default: 30 on a CPU, 2000 on a GPU)"
    )
    parser.add_argument(
        "--asr-steps",
        type=int,
        default=None,
        help="CTC fine-tuning steps (default: 30 on a CPU, 1000 on a GPU)",
    )
    parser.add_argument(
        "--model-size",
        default=None,
        choices=["tiny", "base"],
        help="model preset (default: tiny on a CPU, base on a GPU)",
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--seed", type=int, default=0)


def _on_gpu(device: str) -> bool:
    if device == "cpu":
        return False
    return torch.cuda.is_available()


@dataclass
class Stage:
    """One ``mmssl`` command line; ``done()`` says its output is there and current; ``before()``
    (when set) clears outputs made from other inputs before the stage runs."""

    title: str
    argv: list[str]
    done: Callable[[], bool] = lambda: False
    before: Callable[[], None] | None = None


def _exists(path: Path) -> Callable[[], bool]:
    return path.exists


def started_from_latest(asr: Path, pretrain: Path) -> bool:
    """The fine-tuning run in ``asr`` started from ``pretrain``'s latest checkpoint (the one
    its config.yaml records in ``objective.encoder_init``)."""
    latest = latest_checkpoint(pretrain)
    if latest is None or not (asr / CONFIG_FILE).is_file():
        return False
    started = OmegaConf.select(OmegaConf.load(asr / CONFIG_FILE), "objective.encoder_init")
    return started == str(latest.resolve())


def asr_done(asr: Path, pretrain: Path, steps: int) -> bool:
    """``wer.json`` of the fine-tuning run's latest checkpoint, of ``steps`` steps, started from
    the pretraining run's latest checkpoint."""
    latest, wer = latest_checkpoint(asr), asr / "wer.json"
    if latest is None or not wer.is_file() or not started_from_latest(asr, pretrain):
        return False
    return json.loads(wer.read_text()).get("checkpoint") == latest.name and latest.name == step_dir_name(
        steps
    )


def clear_stale_asr(asr: Path, pretrain: Path) -> None:
    if (asr / CONFIG_FILE).is_file() and not started_from_latest(asr, pretrain):
        print(f"    {asr} started from another checkpoint of {pretrain}: removed, fine-tuning again")
        shutil.rmtree(asr)


def clusters_done(km: Path, pretrain: Path) -> bool:
    """``kmeans.pt`` of a clustering of the pretraining run's latest checkpoint."""
    latest = latest_checkpoint(pretrain)
    if latest is None or not (km / KMEANS_FILE).is_file():
        return False
    return read_kmeans_state(km).get("weights") == str((latest / MODEL_FILE).resolve())


def noisy_done(asr: Path, out: Path) -> bool:
    """``wer.md`` made from the fine-tuning run's latest checkpoint."""
    latest = latest_checkpoint(asr)
    if latest is None or not (out / "wer.md").is_file():
        return False
    found, _ = read_results(out / "results.jsonl")
    return found is not None and found.get("checkpoint") == str(latest.resolve())


def options(**values: object) -> list[str]:
    """``--key value`` pairs in the order given (``fit_fraction`` is ``--fit-fraction``; a list
    gives several values)."""
    argv: list[str] = []
    for key, value in values.items():
        argv.append("--" + key.replace("_", "-"))
        argv += [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
    return argv


def stages(args: argparse.Namespace) -> list[Stage]:
    gpu = _on_gpu(args.device)
    steps = args.steps or (2000 if gpu else 30)
    model = args.model_size or ("base" if gpu else "tiny")
    av = args.out / "corpus" / "av"
    train, valid = str(av / "train.jsonl"), str(av / "valid.jsonl")
    km1, km2, run = args.out / "km_mfcc", args.out / "km_av", args.out / "av_hubert"
    last_layer = "2" if model == "tiny" else "12"
    seeded = [f"train.device={args.device}", f"train.seed={args.seed}", "--resume"]
    return [
        Stage(
            "generate the built-in corpus",
            ["synth", *options(size=args.size, seed=args.seed, out=args.out / "corpus")],
            _exists(args.out / "corpus" / "synth.json"),
        ),
        Stage("check every record of the training manifest", ["data", "check", train]),
        Stage(
            "iteration 1 targets: k-means on MFCC frames",
            [
                "kmeans",
                *options(manifest=[train, valid], features="mfcc", k=CLUSTERS, out=km1, seed=args.seed),
            ],
            _exists(km1 / KMEANS_FILE),
        ),
        Stage(
            "pretrain AV-HuBERT, iteration 1, on audio + lip video (masked prediction of the MFCC targets)",
            [
                "pretrain",
                "av_hubert_iter1",
                f"data.train={train}",
                f"data.valid={valid}",
                f"data.labels={km1}",
            ]
            + [f"objective.num_classes={CLUSTERS}", f"model.size={model}", f"train.max_steps={steps}"]
            + [f"train.save_every={max(steps // 3, 1)}", f"train.valid_every={steps}", f"train.out_dir={run}"]
            + seeded,
        ),
        Stage(
            "cluster the pretrained model's last audio-visual layer (validation split)",
            [
                "kmeans",
                *options(manifest=[valid], checkpoint=run, layer=last_layer, fit_fraction=1, k=CLUSTERS),
            ]
            + options(out=km2, device=args.device, seed=args.seed),
            lambda: clusters_done(km2, run),
        ),
        *asr_stages(args, gpu, train, valid, run),
    ]


def asr_stages(args: argparse.Namespace, gpu: bool, train: str, valid: str, run: Path) -> list[Stage]:
    """CTC fine-tuning of the pretraining run, then its WER under noise."""
    asr, asr_steps = args.out / "asr", args.asr_steps or (1000 if gpu else 30)
    # on a CPU: small batches and the first 50 test records keep both stages near two minutes;
    # the fine-tuning rate is raised from the recipe's 5e-5 (tuned for 20k updates) so that a
    # short run moves at all, one batch per update (not the recipe's 8), and the encoder trains
    # after the first fifth of the steps. Fine-tuning applies no time or channel masks: the
    # iteration-1 encoder (feature masking) has no audio mask embedding, and AV-HuBERT masks in
    # fine-tuning only models pretrained with input masking
    asr_batch = [] if gpu else ["data.max_seconds_per_batch=20"]
    test_limit = [] if gpu else ["--limit", "50"]
    noise = args.out / "corpus" / "noise" / "test"
    test = args.out / "corpus" / "av" / "test.jsonl"
    return [
        Stage(
            "fine-tune the pretrained model for ASR with CTC on the transcripts (character units)",
            ["finetune-asr", "ctc", "--init", str(run), f"data.train={train}", f"data.valid={valid}"]
            + [
                f"train.max_steps={asr_steps}",
                f"train.save_every={max(asr_steps // 3, 1)}",
                "train.valid_every=0",
            ]
            + [f"objective.freeze_steps={asr_steps // 5}", "train.lr=1e-3", "train.accum_steps=1", *asr_batch]
            + [f"train.out_dir={asr}", f"train.device={args.device}", f"train.seed={args.seed}", "--resume"],
            lambda: asr_done(asr, run, asr_steps),
            lambda: clear_stale_asr(asr, run),
        ),
        Stage(
            "WER under noise on the test split: audio only, video only, audio-visual",
            [
                "eval-noisy",
                *options(run=asr, manifest=[test], noise=[noise], noise_types=NOISE_TYPES, snrs=SNRS),
            ]
            + options(device=args.device, seed=args.seed)
            + test_limit,
            lambda: noisy_done(asr, asr / "eval_noisy"),
        ),
    ]


def summary(out: Path) -> str:
    """What the demo measured, read back from the files its stages wrote."""
    lines = ["", "what the demo measured:"]
    metrics = out / "av_hubert" / "metrics.jsonl"
    if metrics.is_file():
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        train = [r for r in rows if "loss" in r]
        if train:
            lines.append(
                f"  AV-HuBERT loss: {train[0]['loss']:.3f} at step {train[0]['step']} -> "
                f"{train[-1]['loss']:.3f} at step {train[-1]['step']}"
            )
        valid = [r for r in rows if "valid_loss" in r]
        if valid:
            lines.append(
                f"  AV-HuBERT validation loss at step {valid[-1]['step']}: {valid[-1]['valid_loss']:.3f}"
            )
    lines.append("  cluster quality on the valid split (phones from the corpus alignments):")
    lines.append(f"    {'targets':<34} {'phone purity':>12} {'cluster purity':>14} {'PNMI':>6}")
    for name, folder in (("MFCC (iteration-1 targets)", "km_mfcc"), ("AV-HuBERT last layer", "km_av")):
        path = out / folder / "quality.json"
        if path.is_file():
            q = json.loads(path.read_text())["by_manifest"].get("valid", {})
            if q:
                lines.append(
                    f"    {name:<34} {q['phone_purity']:>12.3f} {q['cluster_purity']:>14.3f} "
                    f"{q['pnmi']:>6.3f}"
                )
    wer = out / "asr" / "wer.json"
    if wer.is_file():
        w = json.loads(wer.read_text())
        lines.append(
            f"  CTC fine-tuning, valid split (audio + video): WER {100 * w['wer']:.1f}% "
            f"({w['errors']} errors / {w['words']} words)"
        )
    table = out / "asr" / "eval_noisy" / "wer.md"
    if table.is_file():
        lines.append("  WER (%) on the test split under noise:")
        lines += [f"    {line}" for line in table.read_text().splitlines() if line.startswith("|")]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    plan = stages(args)
    print(f"mmssl demo: {len(plan)} stages into {args.out}")
    for i, stage in enumerate(plan, 1):
        print(f"\n[{i}/{len(plan)}] {stage.title}\n    $ mmssl {' '.join(stage.argv)}", flush=True)
        if stage.done():
            print("    already done, skipped")
            continue
        if stage.before is not None:
            stage.before()
        start = time.time()
        code = cli.main(stage.argv)
        if code != 0:
            raise MmsslError(
                f"stage {i} ({stage.title}) failed with exit status {code}; "
                f"run `mmssl demo` again to continue from there"
            )
        print(f"    done in {time.time() - start:.0f} s", flush=True)
    print(summary(args.out))
    print(
        f"\nmmssl demo: finished; corpus, labels, run folders (TensorBoard logs in av_hubert/tb and asr/tb) "
        f"under {args.out}"
    )
    return 0
