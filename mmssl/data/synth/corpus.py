"""Orchestration: speakers, splits, jobs, parallel workers, media files and manifests.

Every random choice is drawn from a generator seeded by ``(seed, stream, index)``, never from
worker scheduling, so the same seed gives byte-identical audio and identical manifests with
any number of workers. Layout under ``out``::

    av/{train,valid,test}.jsonl   av/wav/  av/video/  av/align/
    image/{train,valid,test}.jsonl  image/png/  image/wav/  image/align/
    noise/{train,test}/<kind>_<k>.wav
    synth.json                    the resolved generation settings and counts
"""

from __future__ import annotations

import json
import multiprocessing as mp
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mmssl.data.manifest import write_manifest
from mmssl.data.synth import grammar, lips, scenes
from mmssl.data.synth.noise_sounds import NOISE_KINDS, make_noise
from mmssl.data.synth.speech import SAMPLE_RATE, Espeak, all_voices
from mmssl.data.synth.writers import write_mp4, write_png, write_wav
from mmssl.errors import ConfigError

SPLITS: tuple[str, ...] = ("train", "valid", "test")
CAPTIONS_PER_IMAGE = 5  # as SpokenCOCO
# streams of the random generator: (seed, stream, index)
_SPEAKERS, _AV, _IMAGE, _NOISE, _LOOK = 1, 2, 3, 4, 5
_MEAN_AV_SECONDS = 3.5  # mean audio-visual utterance length measured on the demo size, for --hours


@dataclass(frozen=True)
class SynthConfig:
    """How much to generate. ``av`` and ``images`` are (train, valid, test) counts; ``images``
    counts pictures, each with ``CAPTIONS_PER_IMAGE`` spoken captions."""

    seed: int = 0
    av: tuple[int, int, int] = (16, 4, 4)
    images: tuple[int, int, int] = (4, 1, 1)
    noise_files: int = 1  # per kind and split
    noise_seconds: float = 4.0
    rate_wpm: tuple[int, int] = (130, 200)
    speaker_split: tuple[int, int, int, int] = (72, 8, 12, 12)  # train, valid, test, held apart for babble


PRESETS: dict[str, SynthConfig] = {
    "tiny": SynthConfig(),
    "demo": SynthConfig(av=(2000, 200, 200), images=(480, 60, 60), noise_files=8, noise_seconds=20.0),
}


def config_for(size: str = "tiny", hours: float | None = None, seed: int = 0) -> SynthConfig:
    """A preset, or ``hours`` of audio-visual speech (images and noise scale along)."""
    if hours is not None:
        if hours <= 0:
            raise ConfigError(f"--hours must be positive, got {hours}")
        total = int(round(hours * 3600 / _MEAN_AV_SECONDS))
        av = (total - 2 * (total // 10), total // 10, total // 10)
        images = tuple(max(1, n // 4) for n in av)
        return SynthConfig(
            seed=seed, av=av, images=images, noise_files=max(8, total // 300), noise_seconds=20.0
        )
    if size not in PRESETS:
        raise ConfigError(f"unknown --size {size!r}; known: {', '.join(PRESETS)}")
    return SynthConfig(**{**asdict(PRESETS[size]), "seed": seed})


def _rng(seed: int, stream: int, *index: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, *index])


def speaker_splits(cfg: SynthConfig) -> dict[str, list[str]]:
    """Disjoint speaker sets: train / valid / test, and ``babble_train`` / ``babble_test``
    (held apart: they speak only in the babble noise)."""
    voices = list(all_voices())
    _rng(cfg.seed, _SPEAKERS).shuffle(voices)
    n_train, n_valid, n_test, n_held = cfg.speaker_split
    if sum(cfg.speaker_split) > len(voices):
        raise ConfigError(f"speaker_split {cfg.speaker_split} needs more than the {len(voices)} voices")
    cuts = np.cumsum([n_train, n_valid, n_test, n_held // 2, n_held - n_held // 2])
    names = ("train", "valid", "test", "babble_train", "babble_test")
    bounds = [0, *cuts.tolist()]
    return {name: sorted(voices[a:b]) for name, a, b in zip(names, bounds[:-1], bounds[1:])}


def appearance(seed: int, speaker: str) -> lips.Appearance:
    """A speaker's mouth looks the same in all their videos (stable hash of the name)."""
    return lips.Appearance.sample(_rng(seed, _LOOK, zlib.crc32(speaker.encode())))


def _voice_params(rng: np.random.Generator, cfg: SynthConfig, speaker: str) -> dict:
    base = _rng(cfg.seed, _LOOK, zlib.crc32(speaker.encode()), 1)  # a speaker's own pitch
    pitch = int(np.clip(base.integers(25, 76) + rng.integers(-6, 7), 0, 100))
    return {
        "rate": int(rng.integers(cfg.rate_wpm[0], cfg.rate_wpm[1] + 1)),
        "pitch": pitch,
        "pitch_range": int(base.integers(30, 80)),
    }


def speak(
    text: str, speaker: str, rng: np.random.Generator, cfg: SynthConfig, frame_align: bool
) -> tuple[np.ndarray, list[tuple[str, int, int]], list[tuple[str, int, int]]]:
    """``audio (S,)`` int16 at 16 kHz with its phoneme and word alignment (samples).

    The speech is surrounded by 0.1-0.4 s of quiet (a faint noise floor, not digital
    silence) and, when ``frame_align``, padded to whole 25 fps video frames.
    """
    utt = Espeak.get().say(text, speaker, **_voice_params(rng, cfg, speaker))
    lead = int(rng.integers(1600, 6401))
    total = lead + len(utt.audio) + int(rng.integers(1600, 6401))
    if frame_align:
        total = -(-total // lips.SAMPLES_PER_FRAME) * lips.SAMPLES_PER_FRAME
    audio = np.round(rng.normal(0.0, 4.0, total)).astype(np.int32)  # noise floor, ~-78 dBFS
    audio[lead : lead + len(utt.audio)] += utt.audio
    audio = np.clip(audio, -32768, 32767).astype(np.int16)
    spans = [("", 0, lead)] + [(p, s + lead, e + lead) for p, s, e in utt.phonemes]
    spans.append(("", spans[-1][2], total))
    phonemes: list[tuple[str, int, int]] = []
    for name, start, end in spans:  # adjacent silences become one
        if end <= start:
            continue
        if phonemes and name == "" and phonemes[-1][0] == "":
            phonemes[-1] = ("", phonemes[-1][1], end)
        else:
            phonemes.append((name, start, end))
    words = [(w, s + lead, e + lead) for w, s, e in utt.words]
    return audio, phonemes, words


def _write_align(path: Path, phonemes, words) -> None:
    doc = {
        "sample_rate": SAMPLE_RATE,
        "phonemes": [list(p) for p in phonemes],
        "words": [list(w) for w in words],
    }
    path.write_text(json.dumps(doc, ensure_ascii=False))


@dataclass(frozen=True)
class _Job:
    kind: str  # "av" | "image" | "noise"
    index: int
    split: str
    extra: str = ""


@dataclass
class _Context:
    cfg: SynthConfig
    out: Path
    speakers: dict[str, list[str]] = field(default_factory=dict)


_CTX: _Context | None = None


def _init_worker(cfg: SynthConfig, out: Path) -> None:
    global _CTX
    _CTX = _Context(cfg, out, speaker_splits(cfg))
    Espeak.get()  # each worker process initialises espeak-ng once


def _av_job(ctx: _Context, job: _Job) -> list[dict]:
    rng = _rng(ctx.cfg.seed, _AV, job.index)
    speaker = str(rng.choice(ctx.speakers[job.split]))
    text = grammar.describe(grammar.random_description(rng, p_single=0.15), rng)
    audio, phonemes, words = speak(text, speaker, rng, ctx.cfg, frame_align=True)
    num_frames = len(audio) // lips.SAMPLES_PER_FRAME
    look = appearance(ctx.cfg.seed, speaker)
    video = lips.render_video(phonemes, num_frames, look, lips.Jitter.sample(rng), rng)
    uid = f"av{job.index:06d}"
    root = ctx.out / "av"
    write_wav(root / "wav" / f"{uid}.wav", audio)
    write_mp4(root / "video" / f"{uid}.mp4", video, audio)
    _write_align(root / "align" / f"{uid}.json", phonemes, words)
    return [
        {
            "id": uid,
            "audio": f"wav/{uid}.wav",
            "video": f"video/{uid}.mp4",
            "audio_samples": len(audio),
            "video_frames": num_frames,
            "transcript": text,
            "speaker": speaker,
            "align": f"align/{uid}.json",
        }
    ]


def _image_job(ctx: _Context, job: _Job) -> list[dict]:
    rng = _rng(ctx.cfg.seed, _IMAGE, job.index)
    scene = grammar.random_description(rng)
    objects = scenes.layout(scene, rng)
    picture, _ = scenes.render_scene(objects, rng, clutter_count=int(rng.integers(3, 8)))
    group = f"img{job.index:05d}"
    root = ctx.out / "image"
    write_png(root / "png" / f"{group}.png", picture)
    record_scene = scenes.scene_record(scene, objects)
    voices = rng.choice(ctx.speakers[job.split], size=CAPTIONS_PER_IMAGE, replace=False)
    captions = grammar.describe_distinct(scene, rng, CAPTIONS_PER_IMAGE)
    records = []
    for k, (speaker, caption) in enumerate(zip(voices, captions)):  # five different phrasings, five voices
        audio, phonemes, words = speak(caption, str(speaker), rng, ctx.cfg, frame_align=False)
        uid = f"{group}_{k}"
        write_wav(root / "wav" / f"{uid}.wav", audio)
        _write_align(root / "align" / f"{uid}.json", phonemes, words)
        records.append(
            {
                "id": uid,
                "audio": f"wav/{uid}.wav",
                "image": f"png/{group}.png",
                "caption": caption,
                "group": group,
                "speaker": str(speaker),
                "audio_samples": len(audio),
                "transcript": caption,
                "align": f"align/{uid}.json",
                "scene": record_scene,
            }
        )
    return records


def _noise_job(ctx: _Context, job: _Job) -> list[dict]:
    kind, split = job.extra, job.split
    stream = NOISE_KINDS.index(kind) * 2 + (split == "test")
    rng = _rng(ctx.cfg.seed, _NOISE, stream, job.index)
    noise = make_noise(kind, ctx.cfg.noise_seconds, rng, ctx.speakers[f"babble_{split}"])
    audio = np.clip(np.round(noise * 32767), -32768, 32767).astype(np.int16)
    path = ctx.out / "noise" / split / f"{kind}_{job.index:03d}.wav"
    write_wav(path, audio)
    return [{"id": path.stem, "audio": str(path.relative_to(ctx.out)), "audio_samples": len(audio)}]


def _run_job(job: _Job) -> list[dict]:
    assert _CTX is not None, "worker not initialised"
    handler = {"av": _av_job, "image": _image_job, "noise": _noise_job}[job.kind]
    return handler(_CTX, job)


def _jobs(cfg: SynthConfig) -> list[_Job]:
    jobs: list[_Job] = []
    for kind, counts in (("av", cfg.av), ("image", cfg.images)):
        start = 0
        for split, count in zip(SPLITS, counts):
            jobs += [_Job(kind, i, split) for i in range(start, start + count)]
            start += count
    for split in ("train", "test"):
        jobs += [_Job("noise", k, split, kind) for kind in NOISE_KINDS for k in range(cfg.noise_files)]
    return jobs


def generate(cfg: SynthConfig, out: Path, workers: int = 1, progress: bool = True) -> dict:
    """Write the corpus under ``out`` and return its summary (also saved as ``synth.json``)."""
    out = Path(out)
    for sub in (
        "av/wav",
        "av/video",
        "av/align",
        "image/png",
        "image/wav",
        "image/align",
        "noise/train",
        "noise/test",
    ):
        (out / sub).mkdir(parents=True, exist_ok=True)
    jobs = _jobs(cfg)
    results = _map(jobs, cfg, out, workers, progress)
    manifests: dict[str, dict[str, list[dict]]] = {
        "av": {s: [] for s in SPLITS},
        "image": {s: [] for s in SPLITS},
    }
    noise_files = {"train": 0, "test": 0}
    for job, records in zip(jobs, results):
        if job.kind == "noise":
            noise_files[job.split] += 1
        else:
            manifests[job.kind][job.split].extend(records)
    for task, splits in manifests.items():
        for split, records in splits.items():
            write_manifest(out / task / f"{split}.jsonl", records)
    speakers = speaker_splits(cfg)
    summary = {
        "config": asdict(cfg),
        "counts": {task: {s: len(r) for s, r in splits.items()} for task, splits in manifests.items()},
        "noise_files": noise_files,
        "hours": {
            task: round(sum(r["audio_samples"] for rs in splits.values() for r in rs) / SAMPLE_RATE / 3600, 3)
            for task, splits in manifests.items()
        },
        "speakers": speakers,
    }
    (out / "synth.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _map(jobs: list[_Job], cfg: SynthConfig, out: Path, workers: int, progress: bool) -> list[list[dict]]:
    bar = tqdm(total=len(jobs), desc="synth", unit="job", disable=not progress)
    results: list[list[dict]] = []
    # Always in spawned workers, even one: espeak-ng runs in a fork per utterance (see
    # speech.py), and forking a small worker is much cheaper than forking a caller that has
    # loaded torch.
    with mp.get_context("spawn").Pool(max(1, workers), initializer=_init_worker, initargs=(cfg, out)) as pool:
        for records in pool.imap(_run_job, jobs, chunksize=4):
            results.append(records)
            bar.update()
    bar.close()
    return results
