"""Training-step throughput of one objective: steps/s, audio-seconds/s, peak memory, MFU.

Runs the trainer's own step (forward, backward, clip, fused AdamW) on synthetic batches made
once up front (the batch hook applied on the CPU, as data workers would), so the number is the
model's speed, not the loader's. On CUDA it uses bf16 autocast like ``mmssl pretrain``.

    python tools/bench/pretrain_step.py --objective hubert --size base --batch-size 8 --seconds 15
    python tools/bench/pretrain_step.py --objective wav2vec2 --size tiny --device cpu   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from mmssl.constants import SAMPLE_RATE
from mmssl.registry import OBJECTIVES
from mmssl.testing import synthetic_batch
from mmssl.train.loop import LoopOptions, Trainer
from mmssl.train.optim import Schedule, build_adamw


class _Once:
    """A stream the trainer holds but this benchmark never iterates."""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--objective", default="hubert")
    p.add_argument("--size", default="base", help="tiny | base | large")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seconds", type=float, default=15.0, help="seconds per utterance")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compile, autotune)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--precision", default="bf16", help="bf16 (autocast on CUDA) | fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the objective")
    p.add_argument(
        "--peak-tflops", type=float, default=989.0, help="the card's dense bf16 peak for MFU (H100 SXM: 989)"
    )
    args = p.parse_args()

    import mmssl.objectives  # noqa: F401  (registers the objectives)

    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    torch.manual_seed(0)
    objective = OBJECTIVES.build(args.objective, size=args.size).to(device)
    if args.compile:
        objective.compile()
    # full-length utterances, one a little shorter so the padding paths run; every key the
    # objective reads (audio, video, targets, transcripts, images...), its batch hook applied
    lengths = (args.seconds,) * (args.batch_size - 1) + (0.8 * args.seconds,)
    batches = [synthetic_batch(objective, lengths, seed=seed, image_size=224) for seed in range(4)]
    optimizer = build_adamw(objective, lr=1e-4)
    total = args.warmup + args.steps + 1
    trainer = Trainer(
        objective,
        optimizer,
        Schedule(1e-4, total, "constant"),
        _Once(),  # type: ignore[arg-type]
        LoopOptions(max_steps=total, grad_clip=10.0, precision=args.precision, progress=False),
        tempfile.mkdtemp(),
        device=device,
    )
    objective.train()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    for i in range(args.warmup):
        trainer.train_step([batches[i % len(batches)]])
    with FlopCounterMode(display=False) as flops:
        trainer.train_step([batches[0]])
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for i in range(args.steps):
        trainer.train_step([batches[i % len(batches)]])
    sync()
    elapsed = time.perf_counter() - start
    audio_s = sum(float(b["audio_lens"].sum()) for b in batches) / len(batches) / SAMPLE_RATE
    params = sum(p.numel() for p in objective.parameters() if p.requires_grad)
    steps_per_s = args.steps / elapsed
    result = {
        "objective": args.objective,
        "size": args.size,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": args.precision if device.type == "cuda" else "fp32",
        "compile": args.compile,
        "batch_size": args.batch_size,
        "seconds": args.seconds,
        "trainable_params_M": round(params / 1e6, 2),
        "steps_per_s": round(steps_per_s, 3),
        "audio_sec_per_s": round(steps_per_s * audio_s, 1),
        "gflop_per_step": round(flops.get_total_flops() / 1e9, 2),
    }
    if device.type == "cuda":
        result["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        result["mfu"] = round(flops.get_total_flops() * steps_per_s / (args.peak_tflops * 1e12), 4)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
