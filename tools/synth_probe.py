"""Linear probes on the generated corpus: how much phonetic information the audio and the lips carry.

For every 25 fps frame of the audio-visual split, the label is the phoneme class
(``mmssl.data.synth.phonemes.CLASSES``) at the frame's centre. A logistic regression is fit on
the train split and scored on the test split (unseen speakers), for

* audio: 80-dim Kaldi log filterbanks at 100 Hz, stacked x4 to 25 Hz (320 dims), as the
  audio-visual encoders consume them; clean and with babble from the noise bank mixed in at
  each SNR (train noise for train utterances, test noise for test utterances);
* video: the decoded 88x88 mouth crops area-downsampled to 22x22 (484 dims);
* the majority class of the train frames.

Usage: ``python tools/synth_probe.py DIR`` where DIR came from ``mmssl synth --size demo``.
Prints a Markdown table (as in ``datasets/synth/README.md``).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import cv2
import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from mmssl.data.io import load_audio, load_video
from mmssl.data.manifest import read_manifest
from mmssl.data.noise import NoiseBank, mix_at_snr
from mmssl.data.synth.phonemes import CLASS_INDEX, phoneme_class
from mmssl.nn.fbank import fbank, stack_frames

FRAME = 640  # samples per video frame


def frame_labels(align: dict, num_frames: int) -> np.ndarray:
    """``(T,)`` class id of the phoneme under each frame's centre sample."""
    centres = np.arange(num_frames) * FRAME + FRAME // 2
    labels = np.zeros(num_frames, dtype=np.int64)
    for name, start, end in align["phonemes"]:
        hit = (centres >= start) & (centres < end)
        labels[hit] = CLASS_INDEX[phoneme_class(name)]
    return labels


def audio_features(wav: torch.Tensor, num_frames: int) -> np.ndarray:
    """``(T, 320)``: fbank (100 Hz) stacked x4 to 25 Hz, zero-padded to ``num_frames``."""
    feats = stack_frames(fbank(wav), 4)  # (T', 320)
    out = torch.zeros(num_frames, feats.shape[1])
    n = min(num_frames, feats.shape[0])
    out[:n] = feats[:n]
    return out.numpy()


def video_features(path: str) -> np.ndarray:
    """``(T, 484)``: mouth crops area-downsampled to 22x22, in [0, 1]."""
    frames = load_video(path).numpy()  # (T, 88, 88)
    small = np.stack([cv2.resize(f, (22, 22), interpolation=cv2.INTER_AREA) for f in frames])
    return small.reshape(len(frames), -1).astype(np.float32) / 255.0


def load_split(root: Path, split: str, limit: int, rng: np.random.Generator) -> list[dict]:
    records = read_manifest(root / "av" / f"{split}.jsonl")
    if limit and len(records) > limit:
        records = [records[i] for i in sorted(rng.choice(len(records), limit, replace=False))]
    for r in records:
        r["labels"] = frame_labels(json.loads((root / "av" / r["align"]).read_text()), r["video_frames"])
        r["wav"] = load_audio(r["audio"])
        r["vid"] = video_features(r["video"])
    return records


def audio_matrix(records: list[dict], bank: NoiseBank | None, snr: float | None, seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for r in records:
        wav = r["wav"]
        if bank is not None and snr is not None:
            wav = mix_at_snr(wav, bank.sample(wav.numel(), generator=g), snr, generator=g)
        rows.append(audio_features(wav, r["video_frames"]))
    return np.concatenate(rows)


def probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    scaler = StandardScaler().fit(train_x)
    model = LogisticRegression(max_iter=300, C=1.0)
    with warnings.catch_warnings():  # 300 L-BFGS steps are enough to rank the conditions
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(scaler.transform(train_x), train_y)
    return float((model.predict(scaler.transform(test_x)) == test_y).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("corpus", type=Path, help="folder written by mmssl synth")
    parser.add_argument(
        "--train-utterances", type=int, default=800, help="train utterances to fit on (0: all)"
    )
    parser.add_argument("--test-utterances", type=int, default=0, help="test utterances to score (0: all)")
    parser.add_argument("--snr", type=float, nargs="*", default=[10.0, 0.0, -5.0], help="babble SNRs (dB)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    train = load_split(args.corpus, "train", args.train_utterances, rng)
    test = load_split(args.corpus, "test", args.test_utterances, rng)
    train_y = np.concatenate([r["labels"] for r in train])
    test_y = np.concatenate([r["labels"] for r in test])
    majority = float((test_y == np.bincount(train_y).argmax()).mean())
    video = probe(
        np.concatenate([r["vid"] for r in train]), train_y, np.concatenate([r["vid"] for r in test]), test_y
    )
    banks = {
        split: NoiseBank(sorted(str(p) for p in (args.corpus / "noise" / split).glob("babble_*.wav")))
        for split in ("train", "test")
    }
    rows = [("clean", None)] + [(f"babble {snr:g} dB", snr) for snr in args.snr]
    print(
        f"{len(train)} train / {len(test)} test utterances, {len(train_y)} / {len(test_y)} frames, "
        f"{len(CLASS_INDEX)} phoneme classes\n"
    )
    print("| condition | audio (fbank) | video (mouth pixels) | majority class |")
    print("|---|---|---|---|")
    for name, snr in rows:
        audio = probe(
            audio_matrix(train, banks["train"], snr, args.seed),
            train_y,
            audio_matrix(test, banks["test"], snr, args.seed + 1),
            test_y,
        )
        print(f"| {name} | {100 * audio:.1f}% | {100 * video:.1f}% | {100 * majority:.1f}% |", flush=True)
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
