"""SpokenCOCO (Hsu et al., 2021, "Text-free image-to-speech synthesis using learned segmental
units"): about 600k spoken readings of the MSCOCO captions, 16 kHz wav.

Layout: ``ROOT/SpokenCOCO_{train,val}.json`` (``{"data": [{"image": "val2014/COCO_...jpg",
"captions": [{"text", "speaker", "uttid", "wav": "wavs/val/..."}]}]}``), ``ROOT/wavs/...``
and the COCO 2014 images (``IMAGES/{train2014,val2014}/``, by default ``ROOT/..``). Records:
``id`` (the utterance id), ``audio``, ``audio_samples``, ``image``, ``caption`` and
``transcript`` (the written caption that was read aloud), ``group`` (the image's file name
without extension: captions of one image share it), ``speaker``.

Splits: the json files' own (``train``, ``valid``), or Karpathy & Fei-Fei's (2015) split of
COCO when its ``dataset_coco.json`` is given (``train`` = train + restval, ``valid`` = val,
``test``: 5,000 images each for valid and test), as speech-image retrieval papers report.
"""

from __future__ import annotations

from pathlib import Path

from mmssl.data.prepare.common import Listing, Skip, pick_splits, read_json, require
from mmssl.errors import DataError

CORPUS = "spokencoco"
JSON_SPLITS = {"train": "SpokenCOCO_train.json", "valid": "SpokenCOCO_val.json"}
KARPATHY = {"train": "train", "restval": "train", "val": "valid", "test": "test"}
SPLITS = ("train", "valid", "test")


def read_karpathy(path: Path) -> dict[str, str]:
    """``dataset_coco.json`` -> image path (``val2014/COCO_val2014_....jpg``) -> split."""
    doc = read_json(path, CORPUS, "Karpathy split file")
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise DataError(f"{path}: expected {{'images': [...]}} (Karpathy's dataset_coco.json)")
    found = {}
    for index, item in enumerate(doc["images"]):
        try:
            found[f"{item['filepath']}/{item['filename']}"] = KARPATHY[item["split"]]
        except (KeyError, TypeError):
            raise DataError(
                f"{path}: image {index} lacks 'filepath', 'filename' or a known 'split'"
            ) from None
    return found


def _entries(path: Path) -> list[dict]:
    doc = read_json(path, CORPUS, "caption file")
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise DataError(f"{path}: expected {{'data': [...]}}")
    return doc["data"]


def _records(path: Path, root: Path, images: Path) -> list[tuple[str, dict]]:
    """(image key, record) for every caption of one json, in file order."""
    found = []
    for index, entry in enumerate(_entries(path)):
        try:
            image = entry["image"]
            captions = entry["captions"]
            for caption in captions:
                text = caption["text"].strip()
                record = {
                    "id": caption["uttid"],
                    "audio": str((root / caption["wav"]).resolve()),
                    "image": str((images / image).resolve()),
                    "caption": text,
                    "transcript": text,
                    "group": Path(image).stem,
                    "speaker": caption["speaker"],
                }
                found.append((image, record))
        except (KeyError, TypeError, AttributeError):
            raise DataError(
                f"{path}: entry {index} lacks 'image' or a caption's 'text', 'speaker', 'uttid' or 'wav'"
            ) from None
    return found


def collect(
    root: Path, splits: list[str] | None = None, images: Path | None = None, karpathy: Path | None = None
) -> Listing:
    """List ``root`` (holding the two json files and ``wavs/``) -> records per split."""
    require(root, CORPUS, "corpus folder")
    images = images if images is not None else root.parent
    require(images, CORPUS, "COCO image folder (--images)")
    listing = Listing(CORPUS, {})
    if karpathy is None:
        chosen = pick_splits(list(JSON_SPLITS), SPLITS, splits, root, CORPUS)
        for split in chosen:  # a missing json is an error naming it
            listing.splits[split] = [r for _, r in _records(root / JSON_SPLITS[split], root, images)]
        return listing
    assign = read_karpathy(karpathy)
    chosen = pick_splits([s for s in SPLITS if s in set(assign.values())], SPLITS, splits, root, CORPUS)
    listing.splits = {split: [] for split in chosen}
    for name in JSON_SPLITS.values():
        for image, record in _records(root / name, root, images):
            if image not in assign:
                listing.skipped.append(
                    Skip("-", record["id"], record["image"], "image not in the Karpathy split file")
                )
            elif assign[image] in listing.splits:
                listing.splits[assign[image]].append(record)
    return listing
