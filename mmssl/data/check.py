"""Decode every record of a manifest and report the ones training would skip (the library of
``mmssl data check MANIFEST``, ``mmssl.commands.data_check``).

Checks per record: it has an audio path; each path exists and decodes, to the end the
container declares; audio is at 16 kHz or more, non-empty, finite and not all silent; the
audio and the video last the same (within ``--av-tolerance`` seconds, default one 25 fps
frame); the manifest's ``audio_samples`` / ``video_frames`` agree with what decodes. Prints a
table of bad records (id, file, reason) and a summary; exit status 1 when any record is bad, 0 otherwise.

What the loaders convert on reading is a note, not a problem: audio above 16 kHz is resampled,
several channels are averaged, video at another frame rate is read at 25 fps. Notes are
counted by kind under the summary. Audio below 16 kHz is a problem: resampling cannot give it
the band the models hear (up to 8 kHz). AAC priming and padding are dropped by the decoder
(``mmssl.data.io``), so AAC lengths are compared without them.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import torch
from tqdm import tqdm

from mmssl.constants import SAMPLE_RATE, VIDEO_FPS
from mmssl.data.io import load_audio, load_image, load_video, probe
from mmssl.data.manifest import read_manifest
from mmssl.errors import ConfigError, DataError

DEFAULT_TOLERANCE = 1.0 / VIDEO_FPS  # one video frame
SILENCE_PEAK = 1e-5  # below one 16-bit step (3e-5): nothing was recorded
TRUNCATION_SLACK = 0.1  # seconds; container durations are rounded and include codec padding

Problem = tuple[str, str, str]  # (id, file, reason); a note has the same shape


@dataclass(frozen=True)
class RecordReport:
    """What checking one record found: ``problems`` make it bad (exit status 1); ``notes`` are
    conversions the loaders make on reading it (resampling, downmix), which training reads
    correctly."""

    problems: list[Problem] = field(default_factory=list)
    notes: list[Problem] = field(default_factory=list)


def _reason(err: DataError, path: str) -> str:
    text = str(err)
    return text[len(path) + 2 :] if text.startswith(path + ": ") else text


def _check_audio(
    record: dict, path: str, tolerance: float
) -> tuple[list[str], list[str], float, float | None]:
    """-> (problems, notes, decoded seconds, seconds the container declares)."""
    info = probe(path)
    if not info.has_audio:
        raise DataError(f"{path}: no audio stream")
    reasons, notes = [], []
    if info.audio_rate < SAMPLE_RATE:
        reasons.append(
            f"sample rate {info.audio_rate} Hz, expected {SAMPLE_RATE} Hz "
            f"(resampling cannot fill the band above {info.audio_rate // 2} Hz)"
        )
    elif info.audio_rate != SAMPLE_RATE:
        notes.append(f"audio resampled {info.audio_rate} Hz -> {SAMPLE_RATE} Hz")
    if info.audio_channels and info.audio_channels > 1:
        notes.append(f"{info.audio_channels} audio channels averaged to mono")
    wav = load_audio(path, SAMPLE_RATE)
    if float(wav.abs().max()) < SILENCE_PEAK:
        reasons.append("all-silent audio")
    expected = record.get("audio_samples")
    if expected is not None and abs(wav.numel() - expected) > tolerance * SAMPLE_RATE:
        reasons.append(f"manifest says {expected} audio samples, decoded {wav.numel()}")
    return reasons, notes, wav.numel() / SAMPLE_RATE, info.duration


def _check_video(
    record: dict, path: str, tolerance: float
) -> tuple[list[str], list[str], float, float | None]:
    """-> (problems, notes, decoded seconds, seconds the container declares)."""
    info = probe(path)
    frames = load_video(path, VIDEO_FPS)
    reasons, notes = [], []
    if info.video_fps and abs(info.video_fps - VIDEO_FPS) > 1e-3 * VIDEO_FPS:  # as load_video
        notes.append(f"video {info.video_fps:g} fps read at {VIDEO_FPS:g} fps (frames dropped or repeated)")
    expected = record.get("video_frames")
    if expected is not None and abs(frames.shape[0] - expected) > tolerance * VIDEO_FPS:
        reasons.append(f"manifest says {expected} video frames, decoded {frames.shape[0]}")
    return reasons, notes, frames.shape[0] / VIDEO_FPS, info.duration


def _truncated(
    decoded: dict[str, list[float]], declared: dict[str, float | None], tolerance: float
) -> list[tuple[str, str]]:
    """Files whose longest decoded stream stops short of the container's duration (a
    container header written first, as mkv, opens fine when the end is cut off)."""
    found = []
    for path, lengths in decoded.items():
        total = declared.get(path)
        if total is not None and max(lengths) < total - max(tolerance, TRUNCATION_SLACK):
            reason = f"truncated: decoded {max(lengths):.3f} s of the {total:.3f} s the file declares"
            found.append((path, reason))
    return found


def inspect_record(record: dict, tolerance: float = DEFAULT_TOLERANCE) -> RecordReport:
    """Every problem and every note of one record, each as ``(id, file, text)``."""
    key = str(record.get("id"))
    problems: list[Problem] = []
    notes: list[Problem] = []
    seconds: dict[str, float] = {}
    decoded: dict[str, list[float]] = {}
    declared: dict[str, float | None] = {}
    checks = {"audio": _check_audio, "video": _check_video}
    for name in ("audio", "video", "image"):
        path = record.get(name)
        if not path:
            continue
        try:
            if name == "image":
                load_image(path)
                continue
            reasons, converted, seconds[name], declared[path] = checks[name](record, path, tolerance)
            decoded.setdefault(path, []).append(seconds[name])
            problems += [(key, path, r) for r in reasons]
            notes += [(key, path, n) for n in converted]
        except DataError as err:
            problems.append((key, path, _reason(err, path)))
        except Exception as err:  # a checker reports every failure, it does not stop at one
            problems.append((key, path, f"unexpected {type(err).__name__}: {err}"))
    if not record.get("audio"):  # training, indexing and evaluation all read a record's audio
        problems.append((key, "-", "no audio path"))
    problems += [(key, path, reason) for path, reason in _truncated(decoded, declared, tolerance)]
    a, v = seconds.get("audio"), seconds.get("video")
    if a is not None and v is not None and abs(a - v) > tolerance + 1e-9:
        problems.append(
            (
                key,
                record["video"],
                f"audio lasts {a:.3f} s, video {v:.3f} s (differ by {abs(a - v):.3f} s > {tolerance:.3f} s)",
            )
        )
    return RecordReport(problems, notes)


def check_record(record: dict, tolerance: float = DEFAULT_TOLERANCE) -> list[Problem]:
    """Every problem found in one record, as ``(id, file, reason)``; empty when it is good."""
    return inspect_record(record, tolerance).problems


def _init_worker() -> None:
    torch.set_num_threads(1)  # parallelism comes from the processes


def check_manifest(
    path: str, workers: int = 1, tolerance: float = DEFAULT_TOLERANCE, progress: bool = True
) -> tuple[int, list[Problem], list[Problem]]:
    """Check every record of a manifest -> (number of records, problems, notes), each list in
    manifest order. A manifest with no record, or a negative ``tolerance``, is an error."""
    if not tolerance >= 0:
        raise ConfigError(f"--av-tolerance must be 0 or more seconds; got {tolerance}")
    records = read_manifest(path)
    if not records:
        raise DataError(f"{path}: the manifest has no records")
    inspect = partial(inspect_record, tolerance=tolerance)
    bar = partial(
        tqdm, total=len(records), desc="checking", unit="rec", disable=not progress, file=sys.stderr
    )
    if workers <= 1:
        results = [inspect(r) for r in bar(records)]
    else:
        with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker) as pool:
            chunk = max(1, min(64, len(records) // (workers * 8)))
            results = list(bar(pool.map(inspect, records, chunksize=chunk)))
    return (len(records), [p for r in results for p in r.problems], [n for r in results for n in r.notes])


def format_report(total: int, problems: Sequence[Problem], notes: Sequence[Problem] = ()) -> str:
    """A table of bad records, a summary line (with counts per reason), and the notes counted
    by kind with one file each (every record of a 44.1 kHz corpus has one)."""
    bad_ids = {p[0] for p in problems}
    lines = []
    if problems:
        w_id = max(2, *(len(p[0]) for p in problems))
        w_file = max(4, *(len(p[1]) for p in problems))
        lines.append(f"{'id':<{w_id}}  {'file':<{w_file}}  reason")
        lines += [f"{i:<{w_id}}  {f:<{w_file}}  {r}" for i, f, r in problems]
        lines.append("")
    share = 100.0 * len(bad_ids) / total if total else 0.0
    lines.append(f"{total} records checked, {len(bad_ids)} bad ({share:.1f}%)")
    kinds = Counter(re.sub(r"\d+(\.\d+)?", "N", r.split(" (")[0]) for _, _, r in problems)
    lines += [f"  {count:>6}  {kind}" for kind, count in kinds.most_common()]
    if notes:
        noted = len({n[0] for n in notes})
        lines.append(f"{noted} records read with conversions (notes, not problems):")
        example: dict[str, str] = {}
        for _, file, text in notes:
            example.setdefault(text, file)
        counts = Counter(text for _, _, text in notes)
        lines += [f"  {count:>6}  {text}  (e.g. {example[text]})" for text, count in counts.most_common()]
    return "\n".join(lines)
