"""Tiny batches and configs shared by the tests (and handy in a notebook).

Everything here is small enough to run forward and backward on a CPU in well under a second.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

from mmssl.config import load_config, save_resolved
from mmssl.constants import SAMPLE_RATE
from mmssl.data.collate import collate
from mmssl.objectives.multi import MultiObjective
from mmssl.runs import CHECKPOINTS, MODEL_FILE, build_objective, save_weights, step_dir_name


def tiny_audio_batch(lengths: tuple[int, ...] = (8000, 5600, 3200), seed: int = 0) -> dict[str, Tensor]:
    """A padded waveform batch: ``audio (B, S)``, ``audio_lens (B,)``, zeros after each length."""
    g = torch.Generator().manual_seed(seed)
    audio = torch.zeros(len(lengths), max(lengths))
    for i, n in enumerate(lengths):
        t = torch.arange(n) / SAMPLE_RATE
        tone = torch.sin(2 * torch.pi * (150 + 50 * i) * t)
        audio[i, :n] = 0.3 * tone + 0.05 * torch.randn(n, generator=g)
    return {
        "audio": audio,
        "audio_lens": torch.tensor(lengths),
        "ids": [f"u{i}" for i in range(len(lengths))],
    }


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


def tiny_labelled_audio_batch(num_classes: int = 7, seed: int = 0) -> dict[str, Tensor]:
    """``tiny_audio_batch`` plus ``targets (B, L)``: random cluster ids at 100 Hz (MFCC k-means
    rate), -1 after each utterance's labels."""
    batch = tiny_audio_batch()
    g = torch.Generator().manual_seed(seed)
    labels = (batch["audio_lens"] // 160).tolist()
    targets = torch.full((len(labels), max(labels)), -1)
    for i, n in enumerate(labels):
        targets[i, :n] = torch.randint(num_classes, (n,), generator=g)
    batch["targets"] = targets
    return batch


def utterances_alone(batch: dict, frame_lens: Tensor) -> list[dict]:
    """Each utterance of a padded speech batch as a batch of one, with its padding cut:
    ``audio`` to its samples, ``pred_mask`` to its ``frame_lens`` frames, ``targets`` kept.
    For batch-consistency checks (padded batch == each utterance alone)."""
    out = []
    for i in range(batch["audio"].shape[0]):
        n_samples, n_frames = int(batch["audio_lens"][i]), int(frame_lens[i])
        alone = {"audio": batch["audio"][i : i + 1, :n_samples], "audio_lens": batch["audio_lens"][i : i + 1]}
        if "pred_mask" in batch:
            alone["pred_mask"] = batch["pred_mask"][i : i + 1, :n_frames]
        if "targets" in batch:
            alone["targets"] = batch["targets"][i : i + 1]
        out.append(alone)
    return out


def alone_average(model, batch: dict, weight: str) -> float:
    """The loss of each utterance of ``batch`` alone (``utterances_alone``), averaged with the
    weight each reports as ``out[weight]`` (its predicted frames, slices...): what a padded
    batch's loss must equal when padding changes nothing. Call in eval mode."""
    total, count = 0.0, 0.0
    with torch.no_grad():
        for alone in utterances_alone(batch, model.encoder.frame_lengths(batch["audio_lens"])):
            single = model(alone)
            total += single["loss"].item() * single[weight].item()
            count += single[weight].item()
    return total / count


def noisy_padding(batch: dict, scale: float = 1.0) -> dict:
    """A copy of a speech batch with random samples (times ``scale``) in the padding of ``audio``."""
    audio = batch["audio"].clone()
    for i, n in enumerate(batch["audio_lens"].tolist()):
        audio[i, n:] = scale * torch.randn(audio.shape[1] - n)
    return dict(batch, audio=audio)


def on_meta(batch: dict) -> dict:
    """``batch`` with every tensor on the meta device."""
    return {k: v.to("meta") if torch.is_tensor(v) else v for k, v in batch.items()}


def meta_step(model, batch: dict) -> dict:
    """One forward and backward of ``model`` (built under ``torch.device("meta")``) on
    ``batch`` moved to the meta device. Meta tensors hold no data: ``.item()``, ``bool(tensor)``
    and boolean-mask indexing raise there, so a step that runs shows it needs no host sync
    (checked without a GPU). Asserts a meta loss and a gradient for every parameter; returns
    the outputs."""
    model.zero_grad()
    out = model(on_meta(batch))
    out["loss"].backward()
    assert out["loss"].is_meta and all(p.grad is not None for p in model.parameters())
    return out


WORDS = ("one", "red", "circle", "above", "a", "big", "blue", "square", "two", "green", "stars")


def synthetic_batch(
    objective,
    seconds: tuple[float, ...] = (0.96, 0.72, 0.48),
    seed: int = 0,
    image_size: int = 64,
    hook: bool = True,
) -> dict:
    """A batch with every key ``objective`` reads, made as the data pipeline makes them: the
    ``synthetic_items`` of ``seconds``, collated by ``mmssl.data.collate`` and passed through
    the objective's batch hook (``hook=False``: not). For tests and benchmarks."""
    batch = collate(synthetic_items(objective, seconds, seed, image_size))
    batch_hook = objective.batch_hook() if hook else None
    return batch_hook(batch) if batch_hook is not None else batch


def synthetic_items(
    objective, seconds: tuple[float, ...] = (0.96, 0.72, 0.48), seed: int = 0, image_size: int = 64
) -> list[dict]:
    """Dataset items with every key ``objective`` reads: one per utterance of ``seconds``
    (audio and/or 25 fps video by ``objective.modalities``; cluster targets at
    ``objective.label_rate`` (default 100 Hz) when it, or a part of it, has ``num_classes``; a transcript; a
    caption group; an image through ``objective.image_transform``; caption tokens through
    ``objective.text_tokenizer``), ready for ``mmssl.data.collate``."""
    g = torch.Generator().manual_seed(seed)
    modalities = set(getattr(objective, "modalities", ("audio",)))
    # several objectives in one (``multi``): the targets of the part that reads them
    parts = list(objective.parts.values()) if isinstance(objective, MultiObjective) else [objective]
    labelled = next((p for p in parts if getattr(p, "num_classes", None)), objective)
    classes = getattr(labelled, "num_classes", None)
    rate = float(getattr(labelled, "label_rate", 100.0))
    items = []
    for i, s in enumerate(seconds):
        frames = max(1, int(round(s * 25)))
        n = frames * 640  # samples of whole 25 fps frames, so both streams agree
        words = [WORDS[int(j)] for j in torch.randint(len(WORDS), (3,), generator=g)]
        item: dict = {"id": f"u{i}", "transcript": " ".join(words), "group": f"img{i}"}
        if "audio" in modalities:
            t = torch.arange(n) / SAMPLE_RATE
            item["audio"] = 0.3 * torch.sin(2 * torch.pi * (150 + 50 * i) * t) + 0.05 * torch.randn(
                n, generator=g
            )
        if "video" in modalities:
            item["video"] = torch.rand(frames, 1, 88, 88, generator=g)
        if classes:
            item["targets"] = torch.randint(int(classes), (max(1, int(n * rate / SAMPLE_RATE)),), generator=g)
        if "image" in modalities:
            image = torch.randint(0, 256, (3, image_size, image_size), dtype=torch.uint8, generator=g)
            transform = getattr(objective, "image_transform", None)
            item["image"] = transform(image) if transform is not None else image.float() / 255.0
        if "text" in modalities:
            tokens = torch.as_tensor(objective.text_tokenizer(item["transcript"]), dtype=torch.long)
            item["text"] = tokens[0] if tokens.dim() == 2 else tokens
        items.append(item)
    return items


def overfit(objective, batch: dict, steps: int, lr: float, key: str = "loss") -> list[float]:
    """Train ``objective`` on one ``batch`` for ``steps`` Adam steps at ``lr``; returns
    ``out[key]`` of every step (a learning check: it should fall)."""
    opt = torch.optim.Adam(objective.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        out = objective(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out[key].detach()))
    return losses


HUBERT_STYLE = ("data.labels=x", "objective.num_classes=3")  # builds without a k-means folder


def save_tiny_run(folder, recipe: str, manifest, overrides=HUBERT_STYLE, adjust=None):
    """A tiny untrained run of ``recipe`` on ``manifest`` with ``overrides`` (by default 3
    target classes, so HuBERT-style recipes build without labels), saved as ``mmssl pretrain``
    saves it (``config.yaml`` and ``checkpoints/step_00000001/model.safetensors``);
    ``adjust(objective)`` may change the weights before they are saved. Returns
    ``(objective in eval mode, step folder)``."""

    folder = Path(folder)
    cfg = load_config(recipe, [f"data.train={manifest}", "model.size=tiny", *overrides])
    save_resolved(cfg, folder)
    torch.manual_seed(0)
    objective = build_objective(cfg)
    if adjust is not None:
        adjust(objective)
    step = folder / CHECKPOINTS / step_dir_name(1)
    step.mkdir(parents=True)
    save_weights(objective.state_dict(), step / MODEL_FILE)
    return objective.eval(), step


@contextmanager
def serving(index: str | Path, *options: str, timeout: float = 180.0) -> Iterator[str]:
    """Run ``mmssl serve --index INDEX --port 0 [options]`` in a child process (this checkout's
    ``mmssl`` first on its path) and yield its base URL, ``http://127.0.0.1:PORT``; the server is
    stopped on leaving. For tests and the load benchmark (``tools/bench/serve_load.py``)."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    argv = [sys.executable, "-m", "mmssl.cli", "serve", "--index", str(index), "--port", "0", *options]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + timeout
        lines = []
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"mmssl serve exited {proc.wait()}:\n{''.join(lines)}")
            lines.append(line)
            found = re.search(r" on (http://\S+?)/ ", line)
            if found:
                yield found.group(1)
                return
        raise RuntimeError(f"mmssl serve did not start in {timeout} s:\n{''.join(lines)}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
