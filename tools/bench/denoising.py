"""Noisy-input reconstruction error of frame autoencoder runs (issue 15, item 1): how close each
run's reconstruction from noisy audio comes to the clean log mels, per SNR.

For every run (``autoencoder``, ``denoising_autoencoder``, ``vqvae``: ``mmssl pretrain``
folders), every record of ``--manifest`` is mixed with noise from ``--noise`` at each SNR (as
``mmssl eval-noisy`` mixes: RMS-based, the same noisy audio for every run, seeded per record
and SNR), encoded, decoded, and compared with the log mels of the clean record (mean squared
error over real mel frames and bins, normalised log mels as the training target). ``clean`` is
the error from the clean input, the plain reconstruction.

    python tools/bench/denoising.py --runs runs/ae runs/dae --manifest C/av/valid.jsonl \\
        --noise C/noise/test --snrs clean,20,10,5,0
"""

from __future__ import annotations

import argparse
import zlib
from pathlib import Path

import torch

from mmssl.data.io import load_audio
from mmssl.data.manifest import read_manifest
from mmssl.data.noise import NoiseBank, mix_at_snr
from mmssl.nn.reconstruction import masked_mse
from mmssl.runs import load_objective_from_run
from mmssl.tables import markdown_table


def noisy_copies(waves: list[torch.Tensor], ids: list[str], bank: NoiseBank, snr: str, seed: int):
    if snr == "clean":
        return waves
    out = []
    for rid, wave in zip(ids, waves):
        g = torch.Generator().manual_seed(zlib.crc32(f"{seed}|{rid}|{snr}".encode()))
        out.append(mix_at_snr(wave, bank.sample(wave.shape[0], g), float(snr), g))
    return out


@torch.no_grad()
def error(objective, clean: list[torch.Tensor], noisy: list[torch.Tensor]) -> float:
    """Mean squared error over every real mel frame and bin of the records, one at a time."""
    total = count = 0.0
    for c, n in zip(clean, noisy):
        lens = torch.tensor([c.shape[0]])
        r = objective.reconstruct(n[None], c[None], lens)
        frames = float(r.weight.sum())
        total += float(masked_mse(r.recon, r.target, r.weight)) * frames
        count += frames
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", type=Path, required=True)
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--noise", type=Path, required=True, help="a folder of noise recordings")
    parser.add_argument("--snrs", default="clean,20,10,5,0")
    parser.add_argument("--limit", type=int, default=None, help="the first N records only")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    records = read_manifest(args.manifest)[: args.limit]
    ids = [str(r["id"]) for r in records]
    waves = [load_audio(r["audio"]) for r in records]
    bank = NoiseBank(args.noise)
    snrs = [s.strip() for s in args.snrs.split(",") if s.strip()]
    inputs = {snr: noisy_copies(waves, ids, bank, snr, args.seed) for snr in snrs}
    rows = []
    for run in args.runs:
        objective, _ = load_objective_from_run(run)
        rows.append([run.name] + [error(objective, waves, inputs[snr]) for snr in snrs])
    print(f"log-mel reconstruction MSE against the clean record, {len(records)} records of {args.manifest}")
    print(markdown_table(["run"] + [f"{s} dB" if s != "clean" else s for s in snrs], rows, digits=3))


if __name__ == "__main__":
    main()
