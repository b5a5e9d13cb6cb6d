"""``mmssl demo``: the main job end to end on the built-in generated corpus.

Generate the corpus, decode its audio-visual splits once into memory-mapped files
(``mmssl data pack``, which also lists any record that does not decode), cluster MFCC frames
into iteration-1 targets, pretrain AV-HuBERT's first iteration on audio and lip video
(recipe ``av_hubert_iter1``, no modality dropout, with the later iterations' input masking:
``ITERATION1_MASKS``), then cluster the
pretrained model's middle audio-visual layer on the validation split and compare both
clusterings against the corpus's phone alignments (phone purity, cluster purity, PNMI, as in
the HuBERT paper). Iteration-2 targets for the whole training set are the same ``mmssl
kmeans`` command over ``train.jsonl``, and the later iterations pretrain with recipe
``av_hubert`` (input masking, modality dropout). Then fine-tune the pretrained model for ASR
with CTC (character units) and measure its WER on every test record under babble and music
noise at several SNRs, from audio alone, video alone and both; fine-tune it again on a
seeded tenth of the transcripts, and the same encoder from random weights on the same tenth,
and compare them clean and at -5 dB babble; train speech-image retrieval on the image part
of the corpus, the speech tower started from the first CTC run's, and measure recall@K on the
test split's unseen images. The demo ends with
``summary.json`` and ``report.md`` and prints each of its claims as met, not met or not
measured (:mod:`mmssl.eval.summary`).

Each stage is an ordinary ``mmssl`` command, printed before it runs so it can be repeated by
hand. A stage whose output exists is skipped, so an interrupted demo continues where it
stopped (training resumes). The later stages depend on their inputs: a fine-tuning run that
started from another pretraining checkpoint than the latest (``demo --steps 40`` after a
finished 30-step demo) is removed and redone, and so is the noisy evaluation of another
fine-tuning checkpoint. So is an output made with another recipe than the stage's command line
has now (another rate, mask, model size, seed, corpus size...: ``recipes.json`` in the demo's
folder records them), with every output made from it, so that a demo folder from older code
does not keep old runs; changing only the number of steps continues a run instead.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mmssl import cli
from mmssl.commands.demo_done import (
    asr_done,
    clear_changed_recipes,
    clear_stale_asr,
    clusters_done,
    index_done,
    noisy_done,
    output_of,
    read_record,
    record_recipe,
)
from mmssl.commands.together import Job, run_together
from mmssl.data.importers import KMEANS_FILE
from mmssl.errors import MmsslError
from mmssl.eval.summary import claim_lines, collect, write_report, write_summary
from mmssl.files import read_text

CLUSTERS = 50
SECONDS_FILE = "seconds.json"  # each stage's seconds, written by every demo since it first ran a stage
# the layer the iteration-2 targets cluster: the middle one of each model size, as HuBERT's
# second iteration clusters layer 6 of its 12 (Hsu et al., 2021, sec. IV-D). Measured on the
# small model after 1000 CPU steps with ``ITERATION1_MASKS`` (valid, k=50, PNMI / phone
# purity): layers 1-4 give 0.531 / 0.484, 0.528 / 0.500, 0.524 / 0.492, 0.520 / 0.492
LAYERS = {"tiny": 1, "small": 2, "base": 6}
# CTC units: characters. Measured on the small model (200 steps from the pretrained run): with
# characters CTC leaves the all-blank plateau by step 100 (valid WER 84 %); with byte-pair
# pieces (one per word, vocab 200) it still emits only blanks at step 200.
UNITS = ["objective.units=char"]
# the noisy evaluation grid of the demo (AV-HuBERT reports babble, music, natural and speech
# noise at -10..10 dB; the built-in corpus has babble, music, pink and white noise)
NOISE_TYPES = "babble,music"
SNRS = "clean,10,0,-5"
# CTC fine-tuning trains on clean audio with both streams for this share of its steps, then
# with modality dropout and noise (``objective.augment_after``): measured on the small AV model
# from random weights (60 s batches, lr 1e-3), 600 clean then 400 augmented updates give 21 %
# valid WER and test WER audio 34 / video 41 / both 20 % (greedy); with both from the first
# update, 400 updates stayed near the all-blank output (92 %)
CLEAN_SHARE = 0.6
# decoding of the noisy evaluations: beam search with a word trigram of the training transcripts
# (``mmssl lm``); the main model is also decoded greedily, for the report
LM_ORDER, BEAM = 3, 50
# the labelled subset on which pretrained and from-scratch fine-tuning are compared, and the
# cells they are compared in
SUBSET = 0.1
SUBSET_NOISE_TYPES, SUBSET_SNRS = "babble", "clean,-5"
# both fine-tunings on the labelled tenth (the same recipe for either start): the rate and the
# clean share of their steps, chosen on the valid split. Measured on the demo corpus (small,
# 300 steps of 30 s, pretrained with ``ITERATION1_MASKS``; beam search with the trigram; WER %
# of audio+video at -5 dB babble, pretrained / random weights), by rate and clean share:
#   1e-3: 0.6 84.3 / 92.4, 0.3 70.7 / 95.9, 0.2 67.0 / 97.1
#   2e-3: 0.6 83.5 / 84.9, 0.3 65.9 / 84.6, 0.2 61.2 / 88.0, 0.1 69.0 / 93.1
# A pretrained start learnt its alignments before, so it can spend more of a short run on
# noise and on one stream; a start from random weights needs its clean steps. At 2e-3 and 0.2
# the pretrained start is 28 % below the best random-weights run of the table (84.6), and
# 31.9 / 79.9 % on clean audio alone
# (the rate is the small model's on a CPU; a GPU's base model keeps 1e-3)
SUBSET_LR, SUBSET_CLEAN_SHARE = 2e-3, 0.2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=Path, default=Path("runs/demo"), help="folder for the corpus and the runs"
    )
    parser.add_argument(
        "--size", default="demo", choices=["tiny", "demo"], help="built-in corpus size (default demo)"
    )
    for flag, what in (
        ("--steps", "pretraining"),
        ("--asr-steps", "CTC fine-tuning steps on every transcript"),
        ("--subset-steps", "CTC fine-tuning steps on the labelled subset (both inits)"),
        ("--retrieval-steps", "speech-image training"),
    ):
        key = flag[2:].replace("-", "_")
        parser.add_argument(
            flag,
            type=int,
            default=None,
            help=f"{what} steps (default: {CPU[key]} on a CPU, {GPU[key]} on a GPU)",
        )
    parser.add_argument(
        "--model-size",
        default=None,
        choices=["tiny", "small", "base"],
        help="model preset (default: small on a CPU, base on a GPU; tiny is for tests)",
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--seed", type=int, default=0)


# the demo's one pretraining iteration masks each stream apart, as the reference's later
# iterations do (``masking_type: input``: audio spans 0.8 x 10, video 0.3 x 5), instead of its
# first iteration's one mask over the fused features: the lips stay visible at most masked audio
# frames, so the model learns to read them to predict the targets there. Measured on the demo
# corpus (small, 1000 CPU steps, middle layer, valid, k=50, PNMI / phone purity): feature
# masking 0.477 / 0.437, input masking 0.528 / 0.500 (the MFCC targets: 0.477 / 0.466). The
# labelled tenth's fine-tuning (at 1e-3 and a clean share of 0.6) from each: test WER 26.0 and
# 21.1 % on clean audio, 82.6 and 77.0 % on video. Adding modality dropout (0.5) or noise
# (a quarter at 0 dB, or half at -5..5 dB) to this pretraining gave PNMI 0.525-0.528, phone
# purity 0.486-0.499, and video WER 76-79 % after the same fine-tuning: no gain
ITERATION1_MASKS = [
    "objective.masking_type=input",
    "objective.video_mask_prob=0.3",
    "objective.video_mask_span=5",
]
# pretraining on a CPU: the small model's pre-norm layers take twice the recipe's rate; batches
# of 40 s; one loader process (packed records cost little to read, and there are two cores)
CPU_PRETRAIN = ["train.lr=1e-3", "data.max_seconds_per_batch=40", "data.num_workers=1"]
# steps of each training stage by machine (``--steps`` and the like override them), measured
# on the small model on a 2-core CPU. Pretraining (valid split, k=50, last layer, before the
# frame-centre fix of the cluster quality): PNMI 0.32 after 300 steps, 0.43 / 0.44 / 0.46
# after 500 / 750 / 1000 (MFCC targets: 0.48). CTC on every transcript: 600 steps still met
# claims 2-4, with audio+video at -5 dB babble 46 % against a limit of 49 %; 800 steps give
# 38 %. The labelled tenth: 300 steps of 30 s give 31 % clean audio WER from the pretrained
# run and 81 % from random weights; with 60 s batches (twice the time) both reach 22 %.
# Speech-image: 150 steps gave R@10 81 / 68 % (the claim's limits 67 / 63 %), 300 steps 95 / 90 %
CPU = dict(steps=1000, asr_steps=800, subset_steps=300, retrieval_steps=200)
GPU = dict(steps=2000, asr_steps=1000, subset_steps=500, retrieval_steps=2000)


def _on_gpu(device: str) -> bool:
    if device == "cpu":
        return False
    return torch.cuda.is_available()


@dataclass
class Stage:
    """One ``mmssl`` command line; ``done()`` says its output is there and current; ``before()``
    (when set) clears outputs made from other inputs before the stage runs; ``beside``: on a
    CPU it runs at the same time as the stage before it (:mod:`mmssl.commands.together`)."""

    title: str
    argv: list[str]
    done: Callable[[], bool] = lambda: False
    before: Callable[[], None] | None = None
    beside: bool = False

    def continues(self) -> bool:
        """Continues its own earlier work: a ``--resume`` run whose folder is there (when it
        starts, after ``before``; a run removed as stale starts again)."""
        out = output_of(self.argv)
        return "--resume" in self.argv and out is not None and out.is_dir()


def _exists(path: Path) -> Callable[[], bool]:
    return path.exists


@dataclass
class Plan:
    """What the demo's stages run, from its arguments and the machine."""

    out: Path
    device: str
    seed: int
    model: str
    steps: int
    asr_steps: int
    subset_steps: int
    retrieval_steps: int
    gpu: bool

    @property
    def av(self) -> Path:
        """The audio-visual manifests the runs read: packed by ``mmssl data pack``."""
        return self.out / "corpus" / "packed"

    @property
    def lm(self) -> Path:
        return self.out / "lm" / f"train_{LM_ORDER}gram.arpa"


def make_plan(args: argparse.Namespace) -> Plan:
    gpu = _on_gpu(args.device)
    steps = {key: getattr(args, key) or (GPU if gpu else CPU)[key] for key in CPU}
    return Plan(
        args.out, args.device, args.seed, args.model_size or ("base" if gpu else "small"), **steps, gpu=gpu
    )


def finetune_stage(
    plan: Plan,
    title: str,
    asr: Path,
    init: Path | None,
    subset: float | None,
    dependents: tuple[Path, ...] = (),
    beside: bool = False,
) -> Stage:
    """CTC fine-tuning into ``asr`` from the pretraining run ``init`` (None: from scratch, the
    same encoder architecture), on every training transcript or on a seeded ``subset``.

    One model serves the three conditions of the noisy evaluation: modality dropout (0.5, as
    AV-HuBERT's) trains it on audio alone and video alone too, and noise from the corpus's
    training noise (a different recording than the test noise) is added to half of the
    utterances at -5..5 dB (AV-HuBERT: a quarter, at 0 dB), both from update ``CLEAN_SHARE`` x
    steps on: before that every utterance is clean and has both streams, so that a short run
    learns its alignments first. The rate is raised from the recipe's 5e-5 (tuned for 20k
    updates) so that a short run moves, one batch per update (not the recipe's 8), and the
    encoder trains after the first tenth of the steps. The two runs on the labelled tenth, from
    either start, take ``SUBSET_CLEAN_SHARE`` instead, and on a CPU ``SUBSET_LR``. No time or
    channel masks, for either start: masks meant for a pretrained model slow one trained from
    random weights (a from-scratch CTC run of the tiny model: 100.9 % WER with them, 96.9 %
    without), and the two runs of the labelled tenth must differ only in their start. A run redone from
    a newer pretraining checkpoint takes its ``dependents`` (runs started from it) along."""
    steps = plan.subset_steps if subset else plan.asr_steps
    start = (
        ["--init", str(init)]
        if init is not None
        else ["--init", "none", "objective.encoder=av", f"model.size={plan.model}"]
    )
    argv = [
        "finetune-asr",
        "ctc",
        *start,
        f"data.train={plan.av / 'train.jsonl'}",
        f"data.valid={plan.av / 'valid.jsonl'}",
        *UNITS,
        "objective.modality_dropout=0.5",
        "objective.audio_dropout=0.5",
        f"objective.noise_dir={plan.out / 'corpus' / 'noise' / 'train'}",
        "objective.noise_prob=0.5",
        "objective.noise_snr=[-5,5]",
        f"objective.augment_after={int(steps * (SUBSET_CLEAN_SHARE if subset else CLEAN_SHARE))}",
        "objective.mask_prob=0",
        "objective.mask_channel_prob=0",
        f"train.max_steps={steps}",
        f"train.save_every={max(steps // 3, 1)}",
        "train.valid_every=0",
        f"objective.freeze_steps={steps // 10 if init is not None else 0}",
        f"train.lr={SUBSET_LR if subset and not plan.gpu else 1e-3}",
        "train.accum_steps=1",
        *([] if plan.gpu else [f"data.max_seconds_per_batch={30 if subset else 60}", "data.num_workers=1"]),
        *([f"data.train_subset={subset}"] if subset else []),
        f"train.out_dir={asr}",
        f"train.device={plan.device}",
        f"train.seed={plan.seed}",
        "--resume",
    ]
    return Stage(
        title,
        argv,
        lambda: asr_done(asr, init, steps),
        lambda: clear_stale_asr(asr, init, dependents=dependents),
        beside,
    )


def lm_stage(plan: Plan) -> Stage:
    """A word n-gram of the training transcripts (none of the test sentences' words are new to
    it, but only their grammar is shared: the test sentences are other sentences)."""
    return Stage(
        f"a word {LM_ORDER}-gram language model of the training transcripts (for beam search)",
        ["lm", "--manifest", str(plan.av / "train.jsonl"), "--order", str(LM_ORDER), "--out", str(plan.lm)],
        _exists(plan.lm),
    )


def noisy_stage(
    plan: Plan, title: str, asr: Path, noise_types: str, snrs: str, greedy: bool = False, beside: bool = False
) -> Stage:
    """WER of ``asr``'s latest checkpoint on every test record, noise types x SNRs x modalities,
    decoded by beam search with the language model (``greedy``: greedily, into
    ``eval_noisy_greedy``)."""
    out = asr / ("eval_noisy_greedy" if greedy else "eval_noisy")
    decoding = [] if greedy else ["--decoder", "beam", "--lm", str(plan.lm), "--beam", str(BEAM)]
    return Stage(
        title,
        [
            "eval-noisy",
            "--run",
            str(asr),
            "--manifest",
            str(plan.av / "test.jsonl"),
            "--noise",
            str(plan.out / "corpus" / "noise" / "test"),
            "--noise-types",
            noise_types,
            "--snrs",
            snrs,
            "--device",
            plan.device,
            "--seed",
            str(plan.seed),
            *decoding,
            "--out",
            str(out),
        ],
        lambda: noisy_done(asr, out, noise_types, snrs),
        beside=beside,
    )


def retrieval_stages(plan: Plan, speech: Path) -> list[Stage]:
    """Speech-image training on the image part of the corpus, and recall@K on the test split's
    images, none of which training saw. The speech tower starts from the audio stream of the CTC
    run ``speech`` (AV-HuBERT pretraining, then CTC on the audio-visual transcripts; none of the
    spoken captions) and is fine-tuned with the image tower (the model size's; on a CPU a small
    ResNet from random weights). Measured on the small model, 300 steps, 60 unseen test images,
    speech->image / image->speech R@10 (chance 16.7 / 15.7 %): from the pretrained run 24 % /
    -; from the CTC run, frozen (``objective.freeze_speech``, as SpeechCLIP's HuBERT) 74 / 70 %;
    from the CTC run, fine-tuned, 98 / 88 %."""
    images, run, index = plan.out / "corpus" / "image", plan.out / "speech_image", plan.out / "index"
    steps = plan.retrieval_steps
    cpu = [] if plan.gpu else ["train.lr=5e-4", "data.max_seconds_per_batch=100", "data.num_workers=1"]
    return [
        Stage(
            "train speech-image retrieval from the CTC run's speech tower (CLIP-style)",
            [
                "pretrain",
                "speech_image",
                f"data.train={images / 'train.jsonl'}",
                f"data.valid={images / 'valid.jsonl'}",
                f"model.size={plan.model}",
                f"objective.speech_init={speech}",
                *cpu,
                f"train.max_steps={steps}",
                f"train.save_every={max(steps // 3, 1)}",
                f"train.valid_every={steps}",
                f"train.out_dir={run}",
                f"train.device={plan.device}",
                f"train.seed={plan.seed}",
                "--resume",
            ],
            before=lambda: clear_stale_asr(run, speech, "objective.speech_init"),
        ),
        Stage(
            "index the test split's unseen images and their spoken captions: recall@K both ways",
            [
                "index",
                "--run",
                str(run),
                "--manifest",
                str(images / "test.jsonl"),
                "--out",
                str(index),
                "--ks",
                "1,5,10",
                "--device",
                plan.device,
            ],
            lambda: index_done(index, run),
        ),
    ]


def stages(args: argparse.Namespace) -> list[Stage]:
    plan = make_plan(args)
    av, model, steps = plan.av, plan.model, plan.steps
    source = [str(args.out / "corpus" / "av" / f"{split}.jsonl") for split in ("train", "valid", "test")]
    train, valid = str(av / "train.jsonl"), str(av / "valid.jsonl")
    km1, km2, run = args.out / "km_mfcc", args.out / "km_av", args.out / "av_hubert"
    middle_layer = str(LAYERS[model])
    asr = args.out / "asr"
    subset_pre, subset_scratch = args.out / "asr_subset", args.out / "asr_subset_scratch"
    return [
        Stage(
            "generate the built-in corpus",
            ["synth", "--size", args.size, "--seed", str(args.seed), "--out", str(args.out / "corpus")],
            _exists(args.out / "corpus" / "synth.json"),
        ),
        Stage(
            "decode the audio-visual splits once into memory-mapped files (bad records are listed)",
            ["data", "pack", *source, "--out", str(av)],
            lambda: all((av / f"{Path(m).stem}.jsonl").is_file() for m in source),
        ),
        Stage(
            "iteration 1 targets: k-means on MFCC frames",
            [
                "kmeans",
                "--manifest",
                train,
                valid,
                "--features",
                "mfcc",
                "--k",
                str(CLUSTERS),
                "--out",
                str(km1),
                "--seed",
                str(args.seed),
                "--overwrite",  # the demo's own folder: a stage re-run replaces what a stopped one left
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
                f"objective.num_classes={CLUSTERS}",
                f"model.size={model}",
                f"train.max_steps={steps}",
                f"train.save_every={max(steps // 3, 1)}",
                f"train.valid_every={steps}",
                *ITERATION1_MASKS,
                *([] if plan.gpu else CPU_PRETRAIN),
                f"train.out_dir={run}",
                f"train.device={args.device}",
                f"train.seed={args.seed}",
                "--resume",
            ],
        ),
        Stage(
            "cluster the pretrained model's middle audio-visual layer (validation split)",
            [
                "kmeans",
                "--manifest",
                valid,
                "--checkpoint",
                str(run),
                "--layer",
                middle_layer,
                "--fit-fraction",
                "1",
                "--k",
                str(CLUSTERS),
                "--out",
                str(km2),
                "--device",
                args.device,
                "--seed",
                str(args.seed),
                "--overwrite",  # re-clustered when the run has a newer checkpoint
            ],
            lambda: clusters_done(km2, run, middle_layer),
        ),
        finetune_stage(
            plan,
            "fine-tune the pretrained model for ASR with CTC on the transcripts (character units)",
            asr,
            run,
            None,
            dependents=(args.out / "speech_image",),  # its speech tower is this run's
        ),
        lm_stage(plan),
        noisy_stage(
            plan,
            "WER under noise on the test split: audio only, video only, audio-visual",
            asr,
            NOISE_TYPES,
            SNRS,
        ),
        noisy_stage(
            plan,
            "the same WER grid decoded greedily (no language model)",
            asr,
            NOISE_TYPES,
            SNRS,
            greedy=True,
            beside=True,
        ),
        finetune_stage(
            plan,
            f"fine-tune the pretrained model on a labelled subset ({SUBSET:g} of the transcripts)",
            subset_pre,
            run,
            SUBSET,
        ),
        finetune_stage(
            plan,
            "fine-tune the same encoder from random weights on the same subset (the baseline)",
            subset_scratch,
            None,
            SUBSET,
            beside=True,
        ),
        noisy_stage(
            plan,
            "WER of the subset fine-tuning from the pretrained model",
            subset_pre,
            SUBSET_NOISE_TYPES,
            SUBSET_SNRS,
        ),
        noisy_stage(
            plan,
            "WER of the subset fine-tuning from random weights",
            subset_scratch,
            SUBSET_NOISE_TYPES,
            SUBSET_SNRS,
            beside=True,
        ),
        *retrieval_stages(plan, asr),
    ]


def summary(out: Path) -> str:
    """What the demo measured, read back from the files its stages wrote."""
    lines = ["", "what the demo measured:"]
    metrics = out / "av_hubert" / "metrics.jsonl"
    if metrics.is_file():
        rows = [json.loads(line) for line in read_text(metrics).splitlines() if line.strip()]
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
    for name, folder in (("MFCC (iteration-1 targets)", "km_mfcc"), ("AV-HuBERT middle layer", "km_av")):
        path = out / folder / "quality.json"
        if path.is_file():
            q = json.loads(read_text(path))["by_manifest"].get("valid", {})
            if q:
                lines.append(
                    f"    {name:<34} {q['phone_purity']:>12.3f} "
                    f"{q['cluster_purity']:>14.3f} {q['pnmi']:>6.3f}"
                )
    wer = out / "asr" / "wer.json"
    if wer.is_file():
        w = json.loads(read_text(wer))
        lines.append(
            f"  CTC fine-tuning, valid split (audio + video): WER {100 * w['wer']:.1f}% "
            f"({w['errors']} errors / {w['words']} words)"
        )
    table = out / "asr" / "eval_noisy" / "wer.md"
    if table.is_file():
        lines.append("  WER (%) on the test split under noise:")
        lines += [f"    {line}" for line in read_text(table).splitlines() if line.startswith("|")]
    return "\n".join(lines)


def _stage_seconds(out: Path) -> dict[str, float]:
    return read_record(out / SECONDS_FILE, "to restart the timings") or {}


def _run_stages(out: Path, pending: list[Stage], number: dict[int, int]) -> dict[str, float]:
    """Run ``pending`` (none, one in this process, or several side by side); seconds by title."""
    if not pending:
        return {}
    if len(pending) == 1:
        stage, start = pending[0], time.time()
        code = cli.main(stage.argv)
        if code != 0:
            raise MmsslError(
                f"stage {number[id(stage)]} ({stage.title}) failed with exit status {code}; "
                f"run `mmssl demo` again to continue from there"
            )
        return {stage.title: time.time() - start}
    jobs = [Job(s.title, s.argv, out / "logs" / f"{number[id(s)]:02d}_{s.argv[0]}.log") for s in pending]
    print(
        f"\n    stages {', '.join(str(number[id(s)]) for s in pending)} side by side; their output: "
        + ", ".join(str(job.log) for job in jobs),
        flush=True,
    )
    try:
        return run_together(jobs)
    except MmsslError as err:
        raise MmsslError(f"{err}; run `mmssl demo` again to continue from there") from None


def _groups(plan: list[Stage]) -> list[list[Stage]]:
    """The stages in order, each with the ``beside`` stages that follow it."""
    groups: list[list[Stage]] = []
    for stage in plan:
        if stage.beside and groups:
            groups[-1].append(stage)
        else:
            groups.append([stage])
    return groups


def run(args: argparse.Namespace) -> int:
    plan = stages(args)
    number = {id(stage): i for i, stage in enumerate(plan, 1)}
    # stages side by side on a CPU with cores to share (on a GPU one after the other)
    together = not make_plan(args).gpu and (os.cpu_count() or 1) >= 2
    print(f"mmssl demo: {len(plan)} stages into {args.out}")
    clear_changed_recipes(args.out, [stage.argv for stage in plan], SECONDS_FILE)
    seconds = _stage_seconds(args.out)  # of earlier runs of the demo, for the stages they ran
    for group in _groups(plan) if together else [[stage] for stage in plan]:
        pending = []
        for stage in group:
            header = f"[{number[id(stage)]}/{len(plan)}] {stage.title}"
            print(f"\n{header}\n    $ mmssl {' '.join(stage.argv)}", flush=True)
            if stage.done():
                print("    already done, skipped")
            else:
                pending.append(stage)
        for stage in pending:
            if stage.before is not None:
                stage.before()
            record_recipe(args.out, stage.argv)
        continuing = {id(stage) for stage in pending if stage.continues()}
        took = _run_stages(args.out, pending, number)
        for stage in pending:
            # a run that continues adds to its earlier runs' time; a stage done again replaces it
            earlier = seconds.get(stage.title, 0.0) if id(stage) in continuing else 0.0
            seconds[stage.title] = round(earlier + took[stage.title], 1)
            print(f"    [{number[id(stage)]}] done in {seconds[stage.title]:.0f} s", flush=True)
        if pending:
            (args.out / SECONDS_FILE).write_text(json.dumps(seconds, indent=2) + "\n", encoding="utf-8")
    # the stages' wall time: those side by side count once, as the longest of them
    groups = _groups(plan) if together else [[stage] for stage in plan]
    total = sum(max((seconds.get(s.title, 0.0) for s in group), default=0.0) for group in groups)
    print(summary(args.out))
    result = collect(args.out, {s.title: seconds[s.title] for s in plan if s.title in seconds}, total)
    claims = write_summary(args.out, result)
    report = write_report(args.out, result, claims, [" ".join(s.argv) for s in plan])
    print("\nclaims (summary.json, report.md):")
    print("\n".join(claim_lines(claims)))
    print(
        f"\nmmssl demo: finished in {result['seconds']['total']:.0f} s of stages; {report}, "
        f"{args.out / 'summary.json'}; corpus, labels and run folders "
        f"(TensorBoard logs in their tb/) under {args.out}"
    )
    return 0
