"""Tiny batches and configs shared by the tests (and handy in a notebook).

Everything here is small enough to run forward and backward on a CPU in well under a second.
"""

from __future__ import annotations

import torch
from torch import Tensor

SAMPLE_RATE = 16_000


def tiny_audio_batch(
    lengths: tuple[int, ...] = (8000, 5600, 3200), seed: int = 0
) -> dict[str, Tensor]:
    """A padded waveform batch: ``audio (B, S)``, ``audio_lens (B,)``, zeros after each length."""
    g = torch.Generator().manual_seed(seed)
    audio = torch.zeros(len(lengths), max(lengths))
    for i, n in enumerate(lengths):
        t = torch.arange(n) / SAMPLE_RATE
        tone = torch.sin(2 * torch.pi * (150 + 50 * i) * t)
        audio[i, :n] = 0.3 * tone + 0.05 * torch.randn(n, generator=g)
    return {"audio": audio, "audio_lens": torch.tensor(lengths), "ids": [f"u{i}" for i in range(len(lengths))]}


def tiny_video_batch(
    frames: tuple[int, ...] = (12, 9, 5), size: int = 88, seed: int = 0
) -> dict[str, Tensor]:
    """A padded grayscale mouth-crop batch: ``video (B, T, 1, H, W)`` in [0, 1], ``video_lens (B,)``."""
    g = torch.Generator().manual_seed(seed)
    video = torch.zeros(len(frames), max(frames), 1, size, size)
    for i, n in enumerate(frames):
        video[i, :n] = torch.rand(n, 1, size, size, generator=g)
    return {"video": video, "video_lens": torch.tensor(frames)}


def tiny_av_batch(seconds: tuple[float, ...] = (0.48, 0.36, 0.2), seed: int = 0) -> dict[str, Tensor]:
    """Audio and video of the same utterances: 640 samples per 25 fps frame."""
    frames = tuple(int(round(s * 25)) for s in seconds)
    batch = tiny_audio_batch(tuple(f * 640 for f in frames), seed=seed)
    batch.update(tiny_video_batch(frames, seed=seed))
    return batch
