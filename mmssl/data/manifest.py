"""JSON-lines manifests: one record per line, the only thing datasets read.

Keys (all optional but ``id``)::

    id             str, unique in the manifest
    audio          path to a file with an audio stream (wav, flac, mp4, ...)
    video          path to a file with a video stream (25 fps grayscale mouth crops or faces)
    image          path to an image
    align          path to a phone and word alignment (JSON; the built-in corpus writes them)
    audio_samples  int, samples at 16 kHz (lets samplers bucket without decoding)
    video_frames   int, frames at 25 fps
    transcript     str, what is said
    speaker        str
    group          str, records describing the same image share it
    caption        str, a written caption of the image

Paths are relative to the manifest's folder or absolute; ``read_manifest`` returns them
absolute, ``write_manifest`` writes them relative when they lie inside the manifest's folder,
so a corpus folder can be moved as a whole. Extra keys are allowed: they are kept in the
records (and written back) but nothing in mmssl reads them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from mmssl.constants import SAMPLE_RATE, VIDEO_FPS
from mmssl.errors import ConfigError, DataError
from mmssl.files import atomic_write, text_lines

PATH_KEYS = ("audio", "video", "image", "align")
INT_KEYS = ("audio_samples", "video_frames")
TEXT_KEYS = ("id", "transcript", "speaker", "group", "caption")


def _check_record(record: object, where: str) -> dict:
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    if "id" not in record:
        raise DataError(f"{where}: record has no 'id'")
    for key in PATH_KEYS + TEXT_KEYS:
        if key in record and record[key] is not None and not isinstance(record[key], str):
            raise DataError(f"{where}: {key!r} must be a string, got {record[key]!r}")
    for key in INT_KEYS:
        value = record.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise DataError(f"{where}: {key!r} must be a non-negative integer, got {value!r}")
    return record


def read_manifest(path: str | os.PathLike) -> list[dict]:
    """Read a JSON-lines manifest; media paths come back absolute (resolved against its folder).

    Blank lines are skipped. A line that is not UTF-8 or not a JSON object, lacks ``id``, has
    a value of the wrong type, or repeats an ``id`` raises ``DataError`` naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: manifest not found")
    root = path.resolve().parent
    records: list[dict] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(text_lines(path), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: not valid JSON ({err.msg})") from None
        record = _check_record(record, where)
        key = str(record["id"])
        if key in seen:
            raise DataError(f"{where}: duplicate id {key!r} (first on line {seen[key]})")
        seen[key] = number
        for name in PATH_KEYS:
            if record.get(name):
                record[name] = str(root / record[name])  # an absolute path stays as it is
        if isinstance(record.get("packed"), dict) and record["packed"].get("file"):  # `mmssl data pack`
            record["packed"] = {**record["packed"], "file": str(root / record["packed"]["file"])}
        records.append(record)
    return records


def _relative(value: str, root: Path) -> str:
    target = Path(value)
    if not target.is_absolute():
        return value
    try:
        return target.resolve().relative_to(root).as_posix()
    except ValueError:
        return value


def write_manifest(path: str | os.PathLike, records: Iterable[dict]) -> Path:
    """Write ``records`` as JSON lines (atomically); paths inside the manifest's folder are
    written relative to it, others as given. Raises ``DataError`` on a duplicate id."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    root = path.resolve().parent
    seen: set[str] = set()

    def write(out) -> None:
        for index, record in enumerate(records):
            record = _check_record(dict(record), f"{path}: record {index}")
            if record["id"] in seen:
                raise DataError(f"{path}: duplicate id {record['id']!r} (record {index})")
            seen.add(record["id"])
            for name in PATH_KEYS:
                if record.get(name):
                    record[name] = _relative(str(record[name]), root)
            if isinstance(record.get("packed"), dict) and record["packed"].get("file"):
                record["packed"] = {
                    **record["packed"],
                    "file": _relative(str(record["packed"]["file"]), root),
                }
            out.write(json.dumps(record, ensure_ascii=False) + "\n")

    return atomic_write(path, write, text=True)


def duration_seconds(record: dict) -> float | None:
    """Length of a record from its counts, without decoding: audio first, then video."""
    if record.get("audio_samples") is not None:
        return record["audio_samples"] / SAMPLE_RATE
    if record.get("video_frames") is not None:
        return record["video_frames"] / VIDEO_FPS
    return None


def subset_indices(count: int, subset: float | int | None, seed: int = 0) -> list[int]:
    """Sorted indices of a seeded random subset of ``count`` records: ``subset`` below 1 is a
    fraction (rounded, at least one record), a whole number >= 1 a record count (all records
    when it is not smaller than ``count``), None every record. The same arguments give the same
    records whatever else a run changes (the labelled subset of a fine-tuning, say)."""
    if subset is None:
        return list(range(count))
    if isinstance(subset, bool) or not isinstance(subset, (int, float)) or subset <= 0:
        raise ConfigError(f"a subset is a fraction in (0, 1) or a record count >= 1, got {subset!r}")
    if subset >= 1 and float(subset) != int(subset):
        raise ConfigError(f"a subset of {subset!r}: a fraction is below 1, a record count is whole")
    wanted = max(1, round(subset * count)) if subset < 1 else min(int(subset), count)
    import torch  # lazy: `mmssl synth`'s workers (a fork per utterance) write manifests without it

    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(count, generator=generator)[:wanted].tolist())
