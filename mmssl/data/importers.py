"""Read the manifests fairseq and AV-HuBERT users already have (``mmssl data import``,
``mmssl.commands.data_import``, turns them into JSON-lines manifests).

* ``.tsv``: the first line is a root folder; every other line is either the audio-only
  fairseq form ``path<TAB>n_samples`` or the AV-HuBERT form
  ``id<TAB>video<TAB>audio<TAB>n_video_frames<TAB>n_audio_samples`` (paths relative to the root).
* ``.wrd``: one transcript per line, in the ``.tsv`` order.
* ``.km``: one line of space-separated cluster ids per record, in the ``.tsv`` order.

A labels folder of ``mmssl kmeans`` holds one ``<manifest stem>.km`` per manifest,
``kmeans.pt``, the clustering's summary (:func:`read_kmeans_state`, :func:`kmeans_info`), and
``labels.json``: the clustering's ``k``, features and id (also in ``kmeans.pt``) and, per
manifest stem, the records it labelled (count and a hash of their ids, in order).
:func:`check_labels` refuses labels read for another manifest or made by another clustering.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import torch
from torch import Tensor

from mmssl.errors import DataError
from mmssl.files import read_text


def _lines(path: str | os.PathLike) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    return read_text(path).splitlines()


def _count(value: str, where: str, what: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise DataError(f"{where}: {what} {value!r} is not an integer") from None
    if number < 0:
        raise DataError(f"{where}: {what} {number} is negative")
    return number


def _join(root: Path, value: str) -> str | None:
    value = value.strip()
    return str(root / value) if value else None


def read_tsv(path: str | os.PathLike) -> list[dict]:
    """A fairseq (2 columns) or AV-HuBERT (5 columns) ``.tsv`` -> manifest records with
    absolute paths. A relative root line is taken relative to the ``.tsv``'s folder.

    Audio-only records are named by their path without extension (fairseq has no ids).
    """
    lines = _lines(path)
    if not lines or not lines[0].strip():
        raise DataError(f"{path}:1: the first line must be the root folder")
    root = Path(path).resolve().parent / lines[0].strip()  # an absolute root stays as it is
    records, seen = [], {}
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        cols = line.split("\t")
        if len(cols) == 2:
            rel, samples = cols
            record = {
                "id": os.path.splitext(rel)[0],
                "audio": _join(root, rel),
                "audio_samples": _count(samples, where, "sample count"),
            }
        elif len(cols) == 5:
            key, video, audio, frames, samples = cols
            record = {"id": key, "video": _join(root, video), "audio": _join(root, audio)}
            record["video_frames"] = _count(frames, where, "frame count")
            record["audio_samples"] = _count(samples, where, "sample count")
            record = {k: v for k, v in record.items() if v is not None}
        else:
            raise DataError(
                f"{where}: expected 2 tab-separated columns (path, samples) or 5 "
                f"(id, video, audio, frames, samples), got {len(cols)}"
            )
        if record["id"] in seen:
            raise DataError(f"{where}: duplicate id {record['id']!r} (first on line {seen[record['id']]})")
        seen[record["id"]] = number
        records.append(record)
    return records


def read_wrd(path: str | os.PathLike) -> list[str]:
    """One transcript per line."""
    return [line.strip() for line in _lines(path)]


def read_labels(km_path: str | os.PathLike) -> list[Tensor]:
    """A ``.km`` file -> one ``LongTensor (T_label,)`` per line (an empty line is an empty tensor)."""
    labels = []
    for number, line in enumerate(_lines(km_path), start=1):
        try:
            values = [int(v) for v in line.split()]
        except ValueError:
            raise DataError(f"{km_path}:{number}: labels must be space-separated integers") from None
        labels.append(torch.tensor(values, dtype=torch.long))
    return labels


KMEANS_FILE = "kmeans.pt"


def read_kmeans_state(labels_dir: str | os.PathLike) -> dict:
    """The ``kmeans.pt`` of an ``mmssl kmeans`` folder: ``centroids``, ``k``, ``features``,
    ``label_rate``, ``inertia``, ``weights`` (the weights file clustered, or None for MFCC)."""
    path = Path(labels_dir) / KMEANS_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise DataError(f"{path}: cannot read k-means state ({err})") from None


def kmeans_info(labels_dir: str | os.PathLike) -> dict:
    """``k`` and ``label_rate`` (Hz) of an ``mmssl kmeans`` folder: what a HuBERT-style
    objective needs as ``num_classes`` and ``label_rate``."""
    state = read_kmeans_state(labels_dir)
    try:
        return {"k": int(state["k"]), "label_rate": float(state["label_rate"])}
    except (KeyError, TypeError) as err:
        raise DataError(f"{Path(labels_dir) / KMEANS_FILE}: cannot read k-means state ({err!r})") from None


LABELS_FILE = "labels.json"


def records_fingerprint(records: list[dict]) -> dict:
    """What a ``.km`` file's lines stand for: how many records and a hash of their ids in order."""
    ids = "\n".join(str(r.get("id", "")) for r in records)
    return {"records": len(records), "ids_sha256": hashlib.sha256(ids.encode("utf-8")).hexdigest()}


def check_labels(km_path: str | os.PathLike, records: list[dict], source: str) -> None:
    """Refuse (``DataError``, one line) the labels ``km_path`` for the records of ``source``
    when its folder's ``labels.json`` says they label other records, or were made by another
    clustering than its ``kmeans.pt`` (a folder that mixes two k-means runs). A folder without
    ``labels.json`` (made before it existed, or a fairseq ``.km``) is not checked here."""
    km_path = Path(km_path)
    record_path = km_path.parent / LABELS_FILE
    if not record_path.is_file():
        return
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        labelled = record["manifests"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{record_path}: cannot read the labels record ({err!r})") from None
    entry = labelled.get(km_path.stem)
    if entry is None:
        raise DataError(
            f"{km_path}: not made with the clustering of {record_path} (it labelled "
            f"{', '.join(sorted(labelled)) or 'nothing'}); run `mmssl kmeans` into a new folder"
        )
    if {k: entry.get(k) for k in ("records", "ids_sha256")} != records_fingerprint(records):
        raise DataError(
            f"{km_path}: labels {entry.get('records')} records of {entry.get('path')}, not the "
            f"{len(records)} records of {source}; run `mmssl kmeans --manifest {source}`"
        )
    if (km_path.parent / KMEANS_FILE).is_file():
        state = read_kmeans_state(km_path.parent)
        if state.get("clustering") != record.get("clustering") or state.get("k") != record.get("k"):
            raise DataError(
                f"{km_path.parent}: {KMEANS_FILE} (k={state.get('k')}) is not the clustering that "
                f"made its labels (k={record.get('k')}); run `mmssl kmeans` into a new folder"
            )


def attach_transcripts(records: list[dict], transcripts: list[str], source: str) -> list[dict]:
    """Copy ``transcripts`` into ``records`` (same order); the counts must agree."""
    if len(transcripts) != len(records):
        raise DataError(f"{source}: {len(transcripts)} transcripts for {len(records)} records")
    return [{**r, "transcript": t} for r, t in zip(records, transcripts)]
