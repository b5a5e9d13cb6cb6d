"""LRS3-TED (Afouras et al., 2018): TED talk clips, 224x224 face tracks at 25 fps with their
audio track (16 kHz AAC) in one mp4, and a text file per clip.

Layout: ``ROOT/{pretrain,trainval,test}/<talk id>/<clip>.mp4`` + ``<clip>.txt`` whose first
line is ``Text:  WORDS``. Records: ``id`` (``<folder>/<talk id>/<clip>``, as AV-HuBERT's file
lists), ``audio`` and ``video`` (both the mp4: audio is decoded from the container),
``audio_samples``, ``video_frames``, ``transcript`` (the corpus text, upper case),
``speaker`` (the talk id: one TED talk, one main speaker).

Splits written: ``pretrain`` (its own manifest, whole clips), ``train`` and ``valid`` (from
``trainval``), ``test``. AV-HuBERT (Shi et al., 2022, sec. 4.1) holds 1,200 utterances of
``trainval`` out for validation; its list (``avhubert/preparation/data/lrs3-valid.id``) can be
given as ``valid_ids``, otherwise ``valid_size`` ids are drawn by a seeded shuffle of the sorted
``trainval`` ids, so the same copy and seed always give the same hold-out.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from tqdm import tqdm

from mmssl.data.prepare.common import Listing, Skip, pick_splits, read_text_lines, require
from mmssl.errors import ConfigError, DataError

CORPUS = "lrs3"
SPLITS = ("pretrain", "trainval", "test")
VALID_SIZE = 1200  # AV-HuBERT, sec. 4.1: 1,200 trainval utterances held out for validation


def read_transcript(path: Path) -> str | None:
    """The words of a clip's ``Text:`` line, or None when there is none."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    for line in lines[:3]:
        if line.startswith("Text:"):
            return line[len("Text:") :].strip() or None
    return None


def _folder(root: Path, split: str, progress: bool) -> tuple[list[dict], list[Skip]]:
    records, skipped = [], []
    videos = sorted((root / split).glob("*/*.mp4"))
    for video in tqdm(
        videos, desc=f"reading {split} transcripts", unit="clip", disable=not progress, file=sys.stderr
    ):
        key = f"{split}/{video.parent.name}/{video.stem}"
        text_file = video.with_suffix(".txt")
        if not text_file.is_file():
            skipped.append(Skip(split, key, str(text_file), "no transcript file"))
            continue
        text = read_transcript(text_file)
        if text is None:
            skipped.append(Skip(split, key, str(text_file), "no 'Text:' line"))
            continue
        path = str(video.resolve())
        records.append(
            {"id": key, "audio": path, "video": path, "transcript": text, "speaker": video.parent.name}
        )
    return records, skipped


def hold_out(ids: list[str], size: int, seed: int) -> set[str]:
    """``size`` ids drawn from ``ids`` by a shuffle seeded with ``seed`` (order-independent)."""
    pool = sorted(ids)
    random.Random(seed).shuffle(pool)
    return set(pool[:size])


def collect(
    root: Path,
    splits: list[str] | None = None,
    valid_size: int = VALID_SIZE,
    seed: int = 0,
    valid_ids: Path | None = None,
    progress: bool = False,
) -> Listing:
    """List ``root`` (holding ``pretrain/``, ``trainval/``, ``test/``) -> records per split."""
    require(root, CORPUS, "corpus folder")
    chosen = pick_splits([s for s in SPLITS if (root / s).is_dir()], SPLITS, splits, root, CORPUS)
    listing = Listing(CORPUS, {})
    for split in chosen:
        records, skipped = _folder(root, split, progress)
        listing.skipped += skipped
        if split != "trainval":
            listing.splits[split] = records
            continue
        if valid_ids is not None:
            held = {
                line.strip() for line in read_text_lines(valid_ids, CORPUS, "valid id list") if line.strip()
            }
            if records and not held & {r["id"] for r in records}:
                raise DataError(
                    f"{valid_ids}: none of its {len(held)} ids is a trainval clip of {root} "
                    f"(ids look like 'trainval/<talk id>/<clip>')"
                )
        else:
            if valid_size < 0:
                raise ConfigError(f"lrs3 valid_size must be >= 0, got {valid_size}")
            held = hold_out([r["id"] for r in records], valid_size, seed)
        listing.splits["train"] = [r for r in records if r["id"] not in held]
        listing.splits["valid"] = [r for r in records if r["id"] in held]
    order = ("pretrain", "train", "valid", "test")
    listing.splits = {s: listing.splits[s] for s in order if s in listing.splits}
    return listing
