"""Flickr 8k Audio Caption Corpus (Harwath & Glass, 2015): 40,000 spoken captions of the 8,000
Flickr8k images (Hodosh et al., 2013), 16 kHz wav, five per image.

Layout: the audio corpus ``ROOT/wavs/*.wav``, ``ROOT/wav2capt.txt`` (``<wav> <image> #<n>``
per line) and, when present, ``ROOT/wav2spk.txt`` (``<wav> <speaker>``); the Flickr8k text
files in ``TEXT`` (default ``ROOT``): ``Flickr8k.token.txt`` (``<image>#<n><TAB><caption>``),
``Flickr_8k.{train,dev,test}Images.txt``; the images in ``IMAGES`` (default
``ROOT/../Flicker8k_Dataset``, the name the image archive unpacks to). Records: ``id`` (the
wav's name without extension), ``audio``, ``audio_samples``, ``image``, ``caption`` and
``transcript`` (the written caption that was read aloud), ``group`` (the image's name without
extension), ``speaker`` (when ``wav2spk.txt`` is there). Splits: ``train``, ``valid`` (the dev
images), ``test``; captions of an image in no split list are left out and counted.
"""

from __future__ import annotations

from pathlib import Path

from mmssl.data.prepare.common import Listing, Skip, pick_splits, read_text_lines, require
from mmssl.errors import DataError

CORPUS = "flickr8k"
SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "valid": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
SPLITS = tuple(SPLIT_FILES)
IMAGE_FOLDER = "Flicker8k_Dataset"


def _pairs(path: Path, columns: int, what: str) -> list[tuple[int, list[str]]]:
    """(line number, whitespace-separated columns) of each non-blank line."""
    found = []
    for number, line in enumerate(read_text_lines(path, CORPUS, what), start=1):
        if not line.strip():
            continue
        cols = line.split()
        if len(cols) < columns:
            raise DataError(f"{path}:{number}: expected {columns} columns, got {line.strip()!r}")
        found.append((number, cols))
    return found


def read_captions(path: Path) -> dict[str, str]:
    """``Flickr8k.token.txt`` -> ``'<image>#<n>'`` -> caption."""
    captions = {}
    for number, line in enumerate(read_text_lines(path, CORPUS, "caption file"), start=1):
        if not line.strip():
            continue
        key, tab, text = line.partition("\t")
        if not tab or "#" not in key:
            raise DataError(f"{path}:{number}: expected '<image>#<n><TAB><caption>', got {line.strip()!r}")
        captions[key.strip()] = text.strip()
    return captions


def collect(
    root: Path, splits: list[str] | None = None, images: Path | None = None, text: Path | None = None
) -> Listing:
    """List the audio corpus at ``root`` with the Flickr8k text and images -> records per split."""
    require(root / "wavs", CORPUS, "wav folder")
    text = text if text is not None else root
    images = images if images is not None else root.parent / IMAGE_FOLDER
    require(images, CORPUS, "Flickr8k image folder (--images)")
    chosen = pick_splits(list(SPLITS), SPLITS, splits, root, CORPUS)
    split_of = {}
    for split in SPLITS:
        for line in read_text_lines(text / SPLIT_FILES[split], CORPUS, "image split list"):
            if line.strip():
                split_of[line.strip()] = split
    captions = read_captions(text / "Flickr8k.token.txt")
    speakers = {}
    if (root / "wav2spk.txt").is_file():
        speakers = {cols[0]: cols[1] for _, cols in _pairs(root / "wav2spk.txt", 2, "speaker list")}
    listing = Listing(CORPUS, {split: [] for split in chosen})
    for _, (wav, image, number) in _pairs(root / "wav2capt.txt", 3, "wav-to-caption list"):
        key, audio = Path(wav).stem, root / "wavs" / wav
        split = split_of.get(image)
        caption = captions.get(f"{image}{number}")
        if split is None:
            listing.skipped.append(Skip("-", key, str(images / image), "image in no split list"))
        elif split not in listing.splits:
            continue
        elif caption is None:
            listing.skipped.append(
                Skip(split, key, str(audio), f"no caption {image}{number} in Flickr8k.token.txt")
            )
        else:
            record = {
                "id": key,
                "audio": str(audio.resolve()),
                "image": str((images / image).resolve()),
                "caption": caption,
                "transcript": caption,
                "group": Path(image).stem,
            }
            if wav in speakers:
                record["speaker"] = speakers[wav]
            listing.splits[split].append(record)
    return listing
