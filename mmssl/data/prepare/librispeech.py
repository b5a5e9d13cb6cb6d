"""LibriSpeech (Panayotov et al., 2015): read speech from LibriVox audiobooks, 16 kHz flac.

Layout: ``ROOT/<split>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac`` with one
``<speaker>-<chapter>.trans.txt`` per chapter (``ID TEXT`` per line, upper case). Records:
``id`` (the utterance id), ``audio``, ``audio_samples``, ``transcript`` (the corpus's own
text: normalisation, e.g. lower-casing, happens where text is scored,
``mmssl.data.units.normalize_text``), ``speaker``.
"""

from __future__ import annotations

from pathlib import Path

from mmssl.data.prepare.common import Listing, Skip, pick_splits, read_text_lines, require
from mmssl.errors import DataError

CORPUS = "librispeech"
SPLITS = (
    "train-clean-100",
    "train-clean-360",
    "train-other-500",
    "dev-clean",
    "dev-other",
    "test-clean",
    "test-other",
)


def _chapter(folder: Path, split: str) -> tuple[list[dict], list[Skip]]:
    """Records of one chapter folder, in utterance order, and the entries left out."""
    speaker, chapter = folder.parent.name, folder.name
    trans = folder / f"{speaker}-{chapter}.trans.txt"
    audio = {p.stem: p for p in folder.glob("*.flac")}
    if not audio:
        return [], []
    texts: dict[str, str] = {}
    for number, line in enumerate(read_text_lines(trans, CORPUS, "transcript file"), start=1):
        if not line.strip():
            continue
        key, _, text = line.strip().partition(" ")
        if not text.strip():
            raise DataError(f"{trans}:{number}: expected 'ID TEXT', got {line.strip()!r}")
        texts[key] = text.strip()
    records, skipped = [], []
    for key in sorted(set(audio) | set(texts)):
        if key not in texts:
            skipped.append(Skip(split, key, str(audio[key]), f"no line in {trans.name}"))
        elif key not in audio:
            missing = str(folder / f"{key}.flac")
            skipped.append(Skip(split, key, missing, "listed in the transcript file, no audio file"))
        else:
            records.append(
                {"id": key, "audio": str(audio[key].resolve()), "transcript": texts[key], "speaker": speaker}
            )
    return records, skipped


def collect(root: Path, splits: list[str] | None = None) -> Listing:
    """List ``root`` (the folder holding the split folders) -> records per split."""
    require(root, CORPUS, "corpus folder")
    chosen = pick_splits([s for s in SPLITS if (root / s).is_dir()], SPLITS, splits, root, CORPUS)
    listing = Listing(CORPUS, {})
    for split in chosen:
        records: list[dict] = []
        for folder in sorted(p for p in (root / split).glob("*/*") if p.is_dir()):
            found, skipped = _chapter(folder, split)
            records += found
            listing.skipped += skipped
        listing.splits[split] = records
    return listing
