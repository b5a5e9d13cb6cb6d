"""``mmssl probe``: a frozen run's layers, weighted and summed, probed for phones or speakers
(SUPERB-style; ``mmssl.eval.layer_probe``).

    mmssl probe --task phones|speaker --checkpoint RUN --manifest TRAIN (--valid VALID | --holdout F)
                [--out DIR] [--overwrite] [--steps N] [--batch-size B] [--lr LR] [--hidden H]
                [--max-records N] [--layers all|L1,L2,...] [--modalities audio,video] [--device auto|cpu|cuda]
                [--seed S] [--no-progress]

The run's encoder stays frozen; every layer ``0..L`` of it (0: the transformer's input) is
computed once per record and a probe learns a softmax-weighted sum of them (each layer
layer-normalised, as SUPERB) feeding a small head:

* ``--task phones``: phone recognition, a per-frame linear head (``--hidden H``: one ReLU layer
  of H units first) trained with CTC over the phone sequences of the records' alignments
  (``align`` key, which the built-in corpus writes; silence left out); scored by the phone
  error rate of greedy CTC decoding on the evaluation records;
* ``--task speaker``: speaker identification, the valid frames mean-pooled, a linear head over
  TRAIN's ``speaker`` values, cross-entropy; scored by accuracy. Speaker identification is
  closed-set: evaluation records of a speaker TRAIN lacks are left out and counted; the
  built-in corpus keeps its splits' speakers apart, so hold out part of each TRAIN speaker's
  utterances with ``--holdout F`` instead of ``--valid``.

``--layers`` weighs only those layers (``0``: the transformer's input alone, the baseline a
trained encoder's layers should beat). ``--holdout F`` evaluates on the last fraction F of
each speaker's TRAIN records (speaker task) or of all TRAIN records (phones) and trains on the
rest. Writes ``DIR`` (default
``probes/<run>_<task>``; new, or replaced with ``--overwrite``; written whole):
``probe.json`` (the score, the learned layer weights, the settings, the loss curve's ends),
``layer_weights.png`` (weight against layer) and ``probe.safetensors`` (the probe's weights).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from mmssl.data.manifest import read_manifest
from mmssl.devices import pick_device
from mmssl.errors import ConfigError, DataError
from mmssl.eval.extract import parse_layers, parse_modalities
from mmssl.eval.layer_probe import (
    TASK_KEY,
    TASKS,
    build_probe,
    encode_target,
    evaluate,
    fit,
    holdout_split,
    inventory,
    layer_examples,
    record_targets,
)
from mmssl.eval.record_layers import num_layers
from mmssl.eval.report import line_plot
from mmssl.files import check_new_folder, new_folder, write_text
from mmssl.runs import load_encoder_from_run, save_weights
from mmssl.train.optim import build_adamw

# fewer held-out records than this to score on: a note says the score says little
FEW_SCORED = 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--task", required=True, choices=TASKS, help="phones (CTC, PER) or speaker (accuracy)"
    )
    parser.add_argument(
        "--checkpoint", required=True, help="run folder, checkpoint folder or .safetensors file"
    )
    parser.add_argument("--manifest", required=True, help="JSON-lines manifest to train the probe on")
    held = parser.add_mutually_exclusive_group(required=True)
    held.add_argument("--valid", help="JSON-lines manifest to score the probe on")
    held.add_argument(
        "--holdout", type=float, help="score on this fraction of each speaker's --manifest records instead"
    )
    parser.add_argument("--out", help="output folder (default probes/<run>_<task>)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out when it holds anything")
    parser.add_argument("--steps", type=int, default=1000, help="training steps (default 1000)")
    parser.add_argument("--batch-size", type=int, default=16, help="utterances per step (default 16)")
    parser.add_argument("--lr", type=float, default=1e-2, help="AdamW learning rate (default 1e-2)")
    parser.add_argument("--hidden", type=int, default=0, help="hidden units of the head (default 0: linear)")
    parser.add_argument(
        "--max-records", type=int, default=0, help="first N records of each manifest (default 0: all)"
    )
    parser.add_argument(
        "--modalities", help="audio-visual encoders: comma list of audio,video to read (default both)"
    )
    parser.add_argument(
        "--layers",
        default="all",
        help="layers to weigh: 'all' (default), a comma list, or one (0: the transformer's input alone)",
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the probe's initialisation and batches")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _check_numbers(args: argparse.Namespace) -> None:
    for name in ("steps", "batch_size"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1; got {getattr(args, name)}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ConfigError(f"--lr must be a positive number; got {args.lr}")
    if args.hidden < 0 or args.max_records < 0:
        raise ConfigError("--hidden and --max-records must be >= 0")


def _records(args: argparse.Namespace) -> tuple[list[dict], list[dict], str]:
    """Training and evaluation records, and what the evaluation records are."""
    limit = args.max_records or None
    train = read_manifest(args.manifest)[:limit]
    if not train:
        raise DataError(f"{args.manifest}: the manifest has no records")
    if args.holdout is not None:
        train, held = holdout_split(train, args.holdout, "speaker" if args.task == "speaker" else None)
        if not held:
            raise DataError(
                f"{args.manifest}: --holdout {args.holdout} leaves no record to score on "
                "(no speaker has two records)"
            )
        if len(held) < FEW_SCORED:
            print(
                f"note: --holdout {args.holdout} of {args.manifest} leaves {len(held)} record(s) to score on "
                f"(only speakers with two or more records give one): a score on so few says little"
            )
        return train, held, f"holdout {args.holdout} of {args.manifest}"
    valid = read_manifest(args.valid)[:limit]
    if not valid:
        raise DataError(f"{args.valid}: the manifest has no records")
    return train, valid, str(args.valid)


def run(args: argparse.Namespace) -> int:
    _check_numbers(args)
    device = pick_device(args.device)
    modalities = parse_modalities(args.modalities)
    train, valid, scored_on = _records(args)
    train_raw = record_targets(train, args.task, str(args.manifest))
    valid_raw = record_targets(valid, args.task, str(args.valid or args.manifest))
    names = inventory(train_raw, args.task)
    train_y = [encode_target(t, names, args.task) for t in train_raw]
    valid_y = [encode_target(t, names, args.task) for t in valid_raw]
    unseen = sum(y is None for y in valid_y)
    kept = [i for i, y in enumerate(valid_y) if y is not None]
    valid, valid_y = [valid[i] for i in kept], [valid_y[i] for i in kept]
    if not valid:
        raise DataError(
            f"{args.valid}: none of its {TASK_KEY[args.task]!r} values is in {args.manifest}; speaker "
            "identification is closed-set: score on other utterances of the training speakers (--holdout F)"
        )
    if unseen:
        print(f"note: left out {unseen} record(s) of {args.valid} whose speaker {args.manifest} lacks")
    out = Path(args.out or Path("probes") / f"{Path(args.checkpoint).name}_{args.task}")
    check_new_folder(out, args.overwrite)  # before any work
    encoder = load_encoder_from_run(args.checkpoint).to(device)
    layers = parse_layers(args.layers, num_layers(encoder))
    progress = not args.no_progress
    train_x = layer_examples(encoder, train, train_y, device, modalities, layers, "train", progress)
    valid_x = layer_examples(encoder, valid, valid_y, device, modalities, layers, "valid", progress)
    count, dim = train_x[0].layers.shape[0], train_x[0].layers.shape[-1]
    classes = len(names) + 1 if args.task == "phones" else len(names)
    torch.manual_seed(args.seed)
    probe = build_probe(args.task, count, dim, classes, args.hidden).to(device)
    optimizer = build_adamw(probe, args.lr, weight_decay=0.0)
    losses = fit(
        probe, args.task, train_x, optimizer, args.steps, args.batch_size, device, args.seed, progress
    )
    scores = evaluate(probe, args.task, valid_x, device, args.batch_size)
    weights = probe.layer_weights.weights().detach().cpu().tolist()
    doc = {
        "task": args.task,
        **scores,
        "layer_weights": weights,
        "layers": layers,  # the layer each weight is of
        "best_layer": layers[max(range(len(weights)), key=weights.__getitem__)],
        "checkpoint": str(args.checkpoint),
        "manifest": str(args.manifest),
        "scored_on": scored_on,
        "train_utterances": len(train_x),
        "skipped_unseen": unseen,  # evaluation records whose speaker training lacks
        "classes": names,
        "frame_rate": float(encoder.frame_rate),
        "settings": {k: getattr(args, k) for k in ("steps", "batch_size", "lr", "hidden", "seed")},
        "loss_first": losses[0],
        "loss_last": sum(losses[-10:]) / len(losses[-10:]),
    }
    with new_folder(out, args.overwrite) as tmp:
        write_text(tmp / "probe.json", json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
        save_weights(probe.state_dict(), tmp / "probe.safetensors")
        line_plot(
            [str(i) for i in layers],
            {"weight": weights},
            tmp / "layer_weights.png",
            xlabel="layer (0: transformer input)",
            ylabel="softmax weight",
            title=f"learned layer weights, {args.task} probe",
            ylim=(0.0, None),
        )
    score = f"PER {scores['per']:.3f}" if args.task == "phones" else f"accuracy {scores['accuracy']:.3f}"
    print(
        f"{args.task} probe: {score} on {scores['utterances']} utterances; "
        f"heaviest layer {doc['best_layer']}; wrote {out}/probe.json and layer_weights.png"
    )
    return 0
