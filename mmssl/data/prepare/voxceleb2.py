"""VoxCeleb2 (Chung et al., 2018): celebrity interview clips from YouTube, 224x224 face tracks
at 25 fps with their audio track in one mp4; no transcripts, for pretraining.

Layout: ``ROOT/{dev,test}/mp4/<speaker id>/<youtube id>/<clip>.mp4``. Records: ``id``
(``<speaker id>/<youtube id>/<clip>``), ``audio`` and ``video`` (both the mp4),
``audio_samples``, ``video_frames``, ``speaker``. Splits written: ``dev`` and ``test`` (the
corpus's own, with disjoint speakers).

AV-HuBERT pretrains on the English part only (Shi et al., 2022, sec. 4.1; its id list is
``avhubert/preparation/data/vox-en.id.gz``): ``keep_ids`` keeps only the clips a list names,
matching each line on its last three path parts (``id00012/21Uxsk56VDQ/00001``).
"""

from __future__ import annotations

import gzip
from pathlib import Path

from mmssl.data.prepare.common import Listing, pick_splits, require
from mmssl.errors import DataError

CORPUS = "voxceleb2"
SPLITS = ("dev", "test")


def read_keep_ids(path: Path) -> set[str]:
    """Clip ids of a (possibly gzipped) list, one per line, as ``speaker/youtube/clip``."""
    require(path, CORPUS, "id list")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as lines:
            raw = [line.strip() for line in lines if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read id list ({err})") from None
    keep = set()
    for line in raw:
        parts = line.removesuffix(".mp4").split("/")
        keep.add("/".join(parts[-3:]))
    return keep


def collect(root: Path, splits: list[str] | None = None, keep_ids: Path | None = None) -> Listing:
    """List ``root`` (holding ``dev/mp4/`` and ``test/mp4/``) -> records per split."""
    require(root, CORPUS, "corpus folder")
    chosen = pick_splits([s for s in SPLITS if (root / s / "mp4").is_dir()], SPLITS, splits, root, CORPUS)
    keep = read_keep_ids(keep_ids) if keep_ids is not None else None
    listing = Listing(CORPUS, {})
    for split in chosen:
        records = []
        for video in sorted((root / split / "mp4").glob("*/*/*.mp4")):
            key = f"{video.parent.parent.name}/{video.parent.name}/{video.stem}"
            if keep is not None and key not in keep:
                continue
            path = str(video.resolve())
            records.append({"id": key, "audio": path, "video": path, "speaker": video.parent.parent.name})
        listing.splits[split] = records
    return listing
