"""What every corpus preparation shares: listing problems, measuring media from their
headers in parallel, and writing the manifests with a summary.

A corpus module lists its local copy into a :class:`Listing` (records per split with
absolute media paths, no lengths yet, and the entries it had to leave out). :func:`measure`
then reads every media file's header (``mmssl.data.io.probe``, nothing decoded when the header
knows the length) in worker processes and fills ``audio_samples`` (at 16 kHz) and
``video_frames`` (at 25 fps); a record whose file cannot be used is left out and counted with
its reason. :func:`write_outputs` writes ``OUT/<split>.jsonl``, ``OUT/skipped.jsonl`` and
``OUT/prepare.json`` and returns the summary table.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from mmssl.constants import SAMPLE_RATE, VIDEO_FPS
from mmssl.data.io import load_audio, probe
from mmssl.data.manifest import duration_seconds, write_manifest
from mmssl.errors import DataError
from mmssl.files import read_text, write_text
from mmssl.tables import markdown_table

MEDIA_KEYS = ("audio", "video", "image")


@dataclass(frozen=True)
class Skip:
    """One entry left out of a manifest, and why."""

    split: str
    id: str
    path: str
    reason: str


@dataclass
class Listing:
    """A corpus as listed from its folders: ``splits`` maps a split name to records with
    absolute media paths (in manifest order); ``skipped`` holds what could not be listed."""

    corpus: str
    splits: dict[str, list[dict]]
    skipped: list[Skip] = field(default_factory=list)


def readme(corpus: str) -> str:
    return f"datasets/{corpus}/README.md"


def require(path: Path, corpus: str, what: str) -> Path:
    """``path`` itself, or a ``DataError`` naming it and the corpus's README."""
    if not path.exists():
        raise DataError(f"{path}: {what} not found; {corpus} is expected in the layout of {readme(corpus)}")
    return path


def read_text_lines(path: Path, corpus: str, what: str) -> list[str]:
    require(path, corpus, what)
    try:
        return read_text(path).splitlines()
    except OSError as err:
        raise DataError(f"{path}: cannot read {what} ({err})") from None


def read_json(path: Path, corpus: str, what: str) -> object:
    require(path, corpus, what)
    try:
        return json.loads(read_text(path))
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: cannot read {what} ({err})") from None


def pick_splits(
    present: list[str], known: Sequence[str], wanted: list[str] | None, root: Path, corpus: str
) -> list[str]:
    """The splits to prepare: ``wanted`` (each must be present), else every present one."""
    if wanted:
        unknown = [s for s in wanted if s not in known]
        if unknown:
            raise DataError(f"{corpus}: unknown split(s) {', '.join(unknown)}; known: {', '.join(known)}")
        missing = [s for s in wanted if s not in present]
        if missing:
            raise DataError(
                f"{root}: split folder(s) {', '.join(missing)} not found; "
                f"{corpus} is expected in the layout of {readme(corpus)}"
            )
        return list(wanted)
    if not present:
        raise DataError(
            f"{root}: none of the {corpus} splits ({', '.join(known)}) found; "
            f"expected the layout of {readme(corpus)}"
        )
    return present


def limit_listing(listing: Listing, limit: int | None) -> Listing:
    """At most ``limit`` records per split (the first ones, in manifest order)."""
    if limit is None:
        return listing
    return Listing(listing.corpus, {s: rs[:limit] for s, rs in listing.splits.items()}, listing.skipped)


# --- measuring --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Measured:
    """What one media file's header says; ``error`` set when it cannot be used."""

    audio_seconds: float | None = None
    audio_rate: int | None = None
    video_frames: int | None = None
    video_fps: float | None = None
    has_video: bool = False
    error: str | None = None


def _reason(err: DataError, path: str) -> str:
    text = str(err)
    return text[len(path) + 2 :] if text.startswith(path + ": ") else text


def measure_file(path: str) -> Measured:
    """Header facts of one file. Audio whose header gives no length is decoded to count it."""
    try:
        info = probe(path)
        seconds = info.audio_duration
        if info.has_audio and not seconds:
            seconds = load_audio(path, SAMPLE_RATE).numel() / SAMPLE_RATE
        return Measured(
            seconds,
            info.audio_rate,
            info.video_frames,
            info.video_fps,
            has_video=bool(info.width and info.height),
        )
    except DataError as err:
        return Measured(error=_reason(err, path))
    except Exception as err:  # a measurer reports every file, it does not stop at one
        return Measured(error=f"unexpected {type(err).__name__}: {err}")


def _problem(key: str, fact: Measured) -> str | None:
    """Why a file cannot serve as the record's ``key`` (audio, video, image), or None."""
    if fact.error:
        return fact.error
    if key == "audio" and fact.audio_rate is None:
        return "no audio stream"
    if key == "audio" and round((fact.audio_seconds or 0.0) * SAMPLE_RATE) <= 0:
        return "zero-length audio"
    if key == "video" and (not fact.has_video or fact.video_fps is None):
        return "no video stream"
    if key == "video" and _frames(fact) <= 0:
        return "zero-length video"
    if key == "image" and not fact.has_video:
        return "not an image"
    return None


def _frames(fact: Measured) -> int:
    """Frames at 25 fps: a file at another rate is resampled on loading (``load_video``)."""
    frames = fact.video_frames or 0
    if fact.video_fps and abs(fact.video_fps - VIDEO_FPS) > 1e-3 * VIDEO_FPS:
        frames = round(frames * VIDEO_FPS / fact.video_fps)
    return frames


def _fill(record: dict, facts: dict[str, Measured]) -> tuple[str, str] | None:
    """Write lengths into ``record`` from its files' facts -> None, or (file, why it is left out)."""
    for key in MEDIA_KEYS:
        path = record.get(key)
        if not path:
            continue
        fact = facts[path]
        reason = _problem(key, fact)
        if reason is not None:
            return path, reason
        if key == "audio":
            record["audio_samples"] = round(fact.audio_seconds * SAMPLE_RATE)
        elif key == "video":
            record["video_frames"] = _frames(fact)
    return None


def measure(
    listing: Listing, workers: int = 1, progress: bool = True
) -> tuple[dict[str, list[dict]], list[Skip], Counter]:
    """Read every media file's header once (``workers`` processes, a progress bar) ->
    (records with ``audio_samples`` / ``video_frames``, everything skipped, per split the
    number of audio files not at 16 kHz)."""
    paths = sorted({r[k] for rs in listing.splits.values() for r in rs for k in MEDIA_KEYS if r.get(k)})
    bar = dict(
        total=len(paths), desc=f"probing {listing.corpus}", unit="file", disable=not progress, file=sys.stderr
    )
    if workers <= 1 or len(paths) < 2:
        found = [measure_file(p) for p in tqdm(paths, **bar)]
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            chunk = max(1, min(256, len(paths) // (workers * 16)))
            found = list(tqdm(pool.map(measure_file, paths, chunksize=chunk), **bar))
    facts = dict(zip(paths, found))
    kept: dict[str, list[dict]] = {}
    skipped = list(listing.skipped)
    other_rate: Counter = Counter()
    for split, records in listing.splits.items():
        kept[split] = []
        for record in records:
            record = dict(record)
            problem = _fill(record, facts)
            if problem is not None:
                skipped.append(Skip(split, record["id"], *problem))
                continue
            if record.get("audio") and facts[record["audio"]].audio_rate != SAMPLE_RATE:
                other_rate[split] += 1
            kept[split].append(record)
    return kept, skipped, other_rate


# --- writing -----------------------------------------------------------------------------------
def summarise(
    corpus: str,
    root: Path,
    splits: dict[str, list[dict]],
    skipped: list[Skip],
    other_rate: Counter,
    options: dict,
) -> dict:
    """The ``prepare.json`` document: per split records, hours, skipped (with reasons)."""
    table = {}
    for split, records in splits.items():
        reasons = Counter(s.reason for s in skipped if s.split == split)
        seconds = sum(duration_seconds(r) or 0.0 for r in records)
        table[split] = {
            "records": len(records),
            "hours": round(seconds / 3600, 4),
            "skipped": sum(reasons.values()),
            "skipped_reasons": dict(reasons.most_common()),
            "not_16k": other_rate.get(split, 0),
            "written": bool(records),
        }
    return {
        "corpus": corpus,
        "root": str(root.resolve()),
        "options": options,
        "splits": table,
        "skipped_total": len(skipped),
    }


def summary_table(summary: dict) -> str:
    rows = [(split, s["records"], s["hours"], s["skipped"]) for split, s in summary["splits"].items()]
    return markdown_table(["split", "records", "hours", "skipped"], rows, digits=2)


def write_outputs(out: Path, summary: dict, splits: dict[str, list[dict]], skipped: list[Skip]) -> list[Path]:
    """``OUT/<split>.jsonl`` for each split with records, ``OUT/skipped.jsonl`` (every entry
    left out, with its reason) and ``OUT/prepare.json``; each file replaced atomically."""
    out.mkdir(parents=True, exist_ok=True)
    written = [
        write_manifest(out / f"{split}.jsonl", records) for split, records in splits.items() if records
    ]
    lines = [
        json.dumps({"split": s.split, "id": s.id, "file": s.path, "reason": s.reason}, ensure_ascii=False)
        for s in skipped
    ]
    write_text(out / "skipped.jsonl", "".join(line + "\n" for line in lines))
    write_text(out / "prepare.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return written


def format_report(summary: dict, skipped: list[Skip], out: Path) -> str:
    """The summary table, then the skipped entries counted by reason, then warnings."""
    lines = [summary_table(summary), ""]
    reasons = Counter(s.reason for s in skipped)
    if reasons:
        lines.append(f"{len(skipped)} entries skipped (all listed in {out / 'skipped.jsonl'}):")
        lines += [f"  {count:>7}  {reason}" for reason, count in reasons.most_common(20)]
        if len(reasons) > 20:
            lines.append(f"  ... and {len(reasons) - 20} other reasons")
    for split, s in summary["splits"].items():
        if not s["written"]:
            lines.append(f"{split}: no records, no manifest written")
        if s["not_16k"]:
            lines.append(
                f"{split}: {s['not_16k']} audio files are not at 16 kHz (loading resamples them; "
                f"`mmssl data check` reports them)"
            )
    return "\n".join(lines).rstrip()
