"""A map-style dataset over a manifest: decodes the wanted modalities of one record per item.

Shape legend: S samples, T frames, L tokens, H/W pixels. An item is a dict of per-record
tensors (``audio (S,)``, ``video (T, 1, 88, 88)``, ``image (3, H, W)``, ``text (L,)``,
``targets (T_label,)``) plus ``transcript``/``group``/``id``; ``collate`` pads them.
A record that cannot be used gives ``None`` and is counted; the run stops once too many are bad.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from mmssl.constants import SAMPLE_RATE, VIDEO_FPS
from mmssl.data.importers import check_labels, read_labels
from mmssl.data.io import load_image
from mmssl.data.manifest import duration_seconds, read_manifest
from mmssl.data.store import LIP_STORE, centre_crop, record_audio, record_video
from mmssl.errors import ConfigError, DataError

log = logging.getLogger(__name__)

MODALITIES = ("audio", "video", "image", "text")
LIP_SIZE = 88  # the lip encoder's input window (AV-HuBERT)
# AV-HuBERT normalises grayscale lip crops (in [0, 1]) with these (avhubert/hubert_dataset.py)
LIP_MEAN = 0.421
LIP_STD = 0.165


def lip_frames(frames: Tensor, size: int = LIP_STORE) -> Tensor:
    """``(T, H, W)`` uint8 grayscale -> ``(T, 1, S, S)`` float, normalised as AV-HuBERT, with
    ``S = min(size, H, W)``: the centre square, at most ``size`` (96, AV-HuBERT's stored crops)
    so the lip encoder can still take a random 88x88 window in training (the centre one in
    evaluation). Frames under 88x88 are an error (they are not mouth crops: run
    ``mmssl data lips`` first).
    """
    _, h, w = frames.shape
    if h < LIP_SIZE or w < LIP_SIZE:
        raise DataError(
            f"video frames are {h}x{w}, smaller than the {LIP_SIZE}x{LIP_SIZE} mouth crops expected"
        )
    crop = centre_crop(frames, size)
    x = crop.float().div_(255.0).sub_(LIP_MEAN).div_(LIP_STD)
    return x.unsqueeze(1)  # (T, 1, S, S)


def _find_labels(labels: str | os.PathLike, manifest: str | list[dict]) -> Path:
    path = Path(labels)
    if path.is_dir():
        if not isinstance(manifest, (str, os.PathLike)):
            raise ConfigError(
                f"labels folder {path} needs a manifest path to find <stem>.km; pass the .km file"
            )
        path = path / f"{Path(manifest).stem}.km"
    if not path.is_file():
        raise ConfigError(f"labels {path} not found (a .km file, or an `mmssl kmeans` output folder)")
    return path


def _reason_key(message: str, record: dict) -> str:
    """The kind of failure without file name or id, so each kind is logged once."""
    for key in ("audio", "video", "image", "id"):
        if record.get(key):
            message = message.replace(str(record[key]), "")
    return message.split(" (")[0].strip(": ")


class ManifestDataset(Dataset):
    """Records of a manifest -> item dicts of tensors (see module docstring), or ``None``.

    ``modalities``: any of ``audio``, ``video``, ``image``, ``text`` (the caption, or the
    transcript when there is no caption, through ``text_tokenizer``: ``str -> LongTensor (L,)``
    or ``(1, L)``). ``labels``: a ``.km`` file or an ``mmssl kmeans`` output folder holding
    ``<manifest stem>.km``; gives ``targets``. ``image_transform`` receives ``(3, H, W)``
    uint8 and returns a float tensor (without it: float in [0, 1]). ``audio_transform``
    (e.g. ``mmssl.data.noise.AddNoise``) maps ``(S,) -> (S,)``.

    Bad records (missing or corrupt file, NaN audio, no path for a wanted modality...) are
    skipped: ``__getitem__`` returns ``None``, ``bad_count`` grows, each kind of failure is
    logged once. Once at least ``max(min_seen, 1 / max_bad_fraction)`` records were seen,
    more than ``max_bad_fraction`` of them bad raises ``DataError``. The counts are per
    process: each DataLoader worker judges the records it loads.
    """

    def __init__(
        self,
        manifest: str | os.PathLike | list[dict],
        modalities: Sequence[str] = ("audio",),
        labels: str | os.PathLike | None = None,
        image_transform: Callable[[Tensor], Tensor] | None = None,
        text_tokenizer: Callable[[str], Tensor] | None = None,
        max_bad_fraction: float = 0.01,
        audio_transform: Callable[[Tensor], Tensor] | None = None,
        min_seen: int = 20,
        av_tolerance: float = 1.0 / VIDEO_FPS,
    ) -> None:
        unknown = sorted(set(modalities) - set(MODALITIES))
        if unknown:
            raise ConfigError(f"unknown modalities {unknown}; known: {', '.join(MODALITIES)}")
        if "text" in modalities and text_tokenizer is None:
            raise ConfigError("modality 'text' needs a text_tokenizer")
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ConfigError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        self.source = str(manifest) if isinstance(manifest, (str, os.PathLike)) else "<records>"
        self.records = read_manifest(manifest) if isinstance(manifest, (str, os.PathLike)) else list(manifest)
        self.modalities = tuple(modalities)
        self.labels = None
        if labels is not None:
            path = _find_labels(labels, manifest)
            check_labels(path, self.records, self.source)
            self.labels = read_labels(path)
            if len(self.labels) != len(self.records):
                raise DataError(
                    f"{path}: {len(self.labels)} label lines for {len(self.records)} records in {self.source}"
                )
        self.image_transform = image_transform
        self.text_tokenizer = text_tokenizer
        self.audio_transform = audio_transform
        self.max_bad_fraction = max_bad_fraction
        self.av_tolerance = av_tolerance
        self.min_seen = max(min_seen, math.ceil(1.0 / max_bad_fraction) if max_bad_fraction > 0 else 0)
        self.seen = 0
        self.bad_count = 0
        self._logged: set[str] = set()

    def __len__(self) -> int:
        return len(self.records)

    def durations(self) -> list[float]:
        """Seconds per record from the manifest's counts (no decoding), for bucketing."""
        out = []
        for record in self.records:
            seconds = duration_seconds(record)
            if seconds is None:
                raise DataError(
                    f"{self.source}: record {record['id']!r} has neither audio_samples nor video_frames"
                )
            out.append(seconds)
        return out

    def __getitem__(self, index: int) -> dict | None:
        record = self.records[index]
        self.seen += 1
        try:
            return self._load(index, record)
        except DataError as err:
            self._skip(record, err)
            return None

    def _path(self, record: dict, key: str) -> str:
        path = record.get(key)
        if not path:
            raise DataError(f"record {record['id']!r} has no {key!r} path")
        return path

    def _load(self, index: int, record: dict) -> dict:
        item: dict = {"id": str(record["id"])}
        # records packed by `mmssl data pack` are read from memory-mapped slices, not decoded
        if "audio" in self.modalities:
            self._path(record, "audio")
            audio = record_audio(record)
            item["audio"] = self.audio_transform(audio) if self.audio_transform else audio
        if "video" in self.modalities:
            path = self._path(record, "video")
            frames = record_video(record)
            try:
                item["video"] = lip_frames(frames)
            except DataError as err:
                raise DataError(f"{path}: {err}") from None
        if "image" in self.modalities:
            image = load_image(self._path(record, "image"))
            item["image"] = self.image_transform(image) if self.image_transform else image.float() / 255.0
        if "text" in self.modalities:
            text = record.get("caption") or record.get("transcript")
            if text is None:
                raise DataError(f"record {record['id']!r} has neither caption nor transcript")
            tokens = torch.as_tensor(self.text_tokenizer(text), dtype=torch.long)
            item["text"] = tokens[0] if tokens.dim() == 2 else tokens
        self._check_lengths(record, item)
        if self.labels is not None:
            item["targets"] = self.labels[index]
        for key in ("transcript", "group"):
            if record.get(key) is not None:
                item[key] = record[key]
        if "group" not in item and "image" in item:  # captions of one image file share a group
            item["group"] = record["image"]
        return item

    def _check_lengths(self, record: dict, item: dict) -> None:
        """Decoded lengths against the manifest's counts (a truncated file) and audio against
        video, within ``av_tolerance`` seconds (default one video frame), as ``mmssl data check``."""
        seconds = {}
        for key, count_key, unit, rate in (
            ("audio", "audio_samples", "audio samples", SAMPLE_RATE),
            ("video", "video_frames", "video frames", VIDEO_FPS),
        ):
            if key not in item:
                continue
            decoded = item[key].shape[0]
            seconds[key] = decoded / rate
            declared = record.get(count_key)
            if declared is not None and abs(seconds[key] - declared / rate) > self.av_tolerance:
                raise DataError(
                    f"{record[key]}: decoded {decoded} {unit}, the manifest says {declared} "
                    "(truncated or changed file?)"
                )
        if len(seconds) == 2 and abs(seconds["audio"] - seconds["video"]) > self.av_tolerance + 1e-9:
            raise DataError(
                f"record {record['id']!r}: audio lasts {seconds['audio']:.3f} s and video "
                f"{seconds['video']:.3f} s (more than {self.av_tolerance:.3f} s apart)"
            )

    def _skip(self, record: dict, err: DataError) -> None:
        self.bad_count += 1
        message = str(err)
        reason = _reason_key(message, record)
        if reason not in self._logged:
            self._logged.add(reason)
            log.warning(
                "skipping bad record %r: %s (more records failing this way are only counted)",
                record["id"],
                message,
            )
        if self.seen >= self.min_seen and self.bad_count > self.max_bad_fraction * self.seen:
            raise DataError(
                f"{self.source}: {self.bad_count} of {self.seen} records seen are bad "
                f"(more than max_bad_fraction={self.max_bad_fraction}); last: {message}"
            )
