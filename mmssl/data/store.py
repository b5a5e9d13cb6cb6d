"""Packed corpora: decode a manifest's audio and lip video once, read them back by memory map.

Decoding lip video is what limits audio-visual loading (about 50-70 audio-seconds per second
per pair of CPU cores, BENCHMARKS.md). ``mmssl data pack`` decodes every record once into two
flat files per shard and writes a manifest beside them whose records say where their samples
and frames lie; the dataset then reads slices of memory-mapped files, with no decoder:

    OUT/<stem>.<i>-of-<n>.audio.i16   int16 PCM, 16 kHz mono, every record of the shard in turn
    OUT/<stem>.<i>-of-<n>.video.u8    uint8 grayscale frames, 25 fps, centre crops of at most
                                       96 x 96 (AV-HuBERT's stored crops), in turn
    OUT/<stem>.<i>-of-<n>.jsonl       the shard's records, each with ``packed``:
                                       {"file": "<stem>.<i>-of-<n>", "index": i (manifest order),
                                        "audio": [offset, samples], "video": [offset, T, H, W]}
    OUT/<stem>.jsonl                  every shard's records in manifest order, once all are there

A shard is written under temporary names and renamed when complete, its ``.jsonl`` last, so
``--shard I/N`` runs on many machines and a killed run picks up at the first missing shard.
Records that fail to decode are left out of the store, listed with their reason in
``<stem>.<i>-of-<n>.skipped.jsonl``. The packed manifest keeps its records' order and stem, so
k-means labels (``<stem>.km``) of the source manifest serve it as they are when nothing was
skipped. Audio is stored as int16 (exact for 16-bit sources: decoded samples are multiples of
1/32768); noise augmentation still mixes on the waveform in the data workers.

Shape legend: S samples, T frames, H/W pixels.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from mmssl.data.io import load_audio, load_video
from mmssl.data.manifest import read_manifest, write_manifest
from mmssl.errors import DataError

PACKED = "packed"
LIP_STORE = 96  # AV-HuBERT's stored crops, from which training takes random 88x88 windows
PCM_SCALE = 32768.0


def shard_name(stem: str, shard: int, shards: int) -> str:
    return f"{stem}.{shard:05d}-of-{shards:05d}"


def centre_crop(frames: Tensor, size: int = LIP_STORE) -> Tensor:
    """``(T, H, W)`` -> the centre ``min(size, H, W)`` square, as the loader would crop it."""
    _, h, w = frames.shape
    side = min(size, h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return frames[:, top : top + side, left : left + side]


def decode(record: dict) -> tuple[np.ndarray | None, np.ndarray | None, str | None]:
    """One record's ``(int16 (S,), uint8 (T, H, W), None)``, or ``(None, None, reason)``."""
    try:
        audio = video = None
        if record.get("audio"):
            wav = load_audio(record["audio"]).numpy()
            audio = np.clip(np.round(wav * PCM_SCALE), -32768, 32767).astype(np.int16)
        if record.get("video"):
            video = np.ascontiguousarray(centre_crop(load_video(record["video"])).numpy())
        if audio is None and video is None:
            raise DataError(f"record {record['id']!r} has neither audio nor video to pack")
        return audio, video, None
    except DataError as err:
        return None, None, str(err)


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def pack_shard(
    manifest: str | os.PathLike,
    out: str | os.PathLike,
    shard: int = 0,
    shards: int = 1,
    workers: int = 1,
    progress: bool = True,
) -> Path:
    """Pack records ``shard, shard + shards, ...`` of ``manifest`` into ``out``; returns the
    shard's manifest (at once when it is already there)."""
    out = Path(out)
    name = shard_name(Path(manifest).stem, shard, shards)
    done = out / f"{name}.jsonl"
    if done.is_file():
        return done
    records = read_manifest(manifest)[shard::shards]  # an unreadable manifest leaves no folder behind
    out.mkdir(parents=True, exist_ok=True)
    indices = range(shard, shard + len(records) * shards, shards)  # manifest positions
    files = {kind: out / f"{name}.{kind}" for kind in ("audio.i16", "video.u8")}
    kept, skipped, offsets = [], [], {"audio.i16": 0, "video.u8": 0}
    with (
        open(_tmp(files["audio.i16"]), "wb") as fa,
        open(_tmp(files["video.u8"]), "wb") as fv,
        ProcessPoolExecutor(max(1, workers)) as pool,
    ):
        decoded = pool.map(decode, records, chunksize=4)
        for index, record, (audio, video, reason) in tqdm(
            zip(indices, records, decoded),
            total=len(records),
            desc=f"pack {name}",
            unit="utt",
            disable=not progress,
        ):
            if reason is not None:
                skipped.append({"id": record["id"], "reason": reason})
                continue
            packed: dict = {"file": str((out / name).resolve()), "index": index}
            if audio is not None:
                packed["audio"] = [offsets["audio.i16"], int(audio.shape[0])]
                fa.write(audio.tobytes())
                offsets["audio.i16"] += int(audio.shape[0])
            if video is not None:
                packed["video"] = [offsets["video.u8"], *map(int, video.shape)]
                fv.write(video.tobytes())
                offsets["video.u8"] += int(video.size)
            kept.append({**record, PACKED: packed})
    for path in files.values():
        os.replace(_tmp(path), path)
    (out / f"{name}.skipped.jsonl").write_text(
        "".join(json.dumps(s) + "\n" for s in skipped), encoding="utf-8"
    )
    return write_manifest(done, kept)  # written last: the shard is complete


def merge(manifest: str | os.PathLike, out: str | os.PathLike, shards: int) -> Path | None:
    """``OUT/<stem>.jsonl``: every shard's records in manifest order, once every shard is
    packed (None before that)."""
    out, stem = Path(out), Path(manifest).stem
    parts = [out / f"{shard_name(stem, i, shards)}.jsonl" for i in range(shards)]
    if not all(p.is_file() for p in parts):
        return None
    records = sorted((r for p in parts for r in read_manifest(p)), key=lambda r: r[PACKED]["index"])
    return write_manifest(out / f"{stem}.jsonl", records)


class PackedReader:
    """Slices of packed files, each memory-mapped once per process (data workers included)."""

    def __init__(self) -> None:
        self._maps: dict[str, np.memmap] = {}

    def __getstate__(self) -> dict:
        return {"_maps": {}}  # a worker maps the files itself rather than receiving copies

    def _map(self, path: str, dtype: type) -> np.memmap:
        if path not in self._maps:
            if not Path(path).is_file():
                raise DataError(f"{path}: packed file not found (run `mmssl data pack` again)")
            self._maps[path] = np.memmap(path, dtype=dtype, mode="r")
        return self._maps[path]

    def audio(self, packed: dict) -> Tensor:
        """``(S,)`` float32 in [-1, 1] of a record's ``packed`` entry."""
        offset, count = packed["audio"]
        data = self._map(f"{packed['file']}.audio.i16", np.int16)[offset : offset + count]
        return torch.from_numpy(data.astype(np.float32)) / PCM_SCALE

    def video(self, packed: dict) -> Tensor:
        """``(T, H, W)`` uint8 of a record's ``packed`` entry."""
        offset, t, h, w = packed["video"]
        data = self._map(f"{packed['file']}.video.u8", np.uint8)[offset : offset + t * h * w]
        return torch.from_numpy(np.array(data).reshape(t, h, w))


READER = PackedReader()  # one per process: what every loader of records shares


def record_audio(record: dict) -> Tensor:
    """A record's ``(S,)`` float32 16 kHz waveform: from its packed slice, else decoded."""
    packed = record.get(PACKED)
    return READER.audio(packed) if packed and "audio" in packed else load_audio(record["audio"])


def record_video(record: dict) -> Tensor:
    """A record's ``(T, H, W)`` uint8 frames at 25 fps: from its packed slice, else decoded."""
    packed = record.get(PACKED)
    return READER.video(packed) if packed and "video" in packed else load_video(record["video"])
