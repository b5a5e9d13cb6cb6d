"""Querying a retrieval index (``mmssl index``) with speech or text, for ``mmssl retrieve``
(``mmssl.commands.retrieve``, whose docstring describes the command): reading the index, the
run that embeds the queries (and whether its weights are the index's), the best images of
each query, and the contact sheet of the results.

Shape legend: Q queries, N indexed images, D embedding dim.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw, UnidentifiedImageError
from torch import Tensor

from mmssl.errors import DataError
from mmssl.eval.retrieval import (
    IMAGES,
    INDEX_FILE,
    LoadedRun,
    load_run,
    read_embeddings,
    read_jsonl,
)
from mmssl.eval.search import FAISS_FILE, ImageSearch
from mmssl.files import read_text, sha256_file, stale_folders
from mmssl.runs import resolve_weights

THUMB = 128  # contact sheet thumbnail side, pixels
LABEL = 18  # height of the text line under each thumbnail


def read_index(index_dir: str | Path) -> tuple[dict, Tensor, list[dict]]:
    """``(meta, embeddings (N, D), rows)`` of an index folder; a missing file, or one that does
    not agree with ``index.json`` (counts, dimension, checksum), is a ``DataError`` naming it."""
    index_dir = Path(index_dir)
    if not index_dir.is_dir():
        left = [p for p in stale_folders(index_dir) if p.name.endswith("dir-old")]
        hint = f"; an interrupted `mmssl index` left the previous one in {left[-1]}" if left else ""
        raise DataError(f"{index_dir}: no such index folder (make it with `mmssl index`){hint}")
    meta_path = index_dir / INDEX_FILE
    if not meta_path.is_file():
        raise DataError(f"{meta_path}: not found (make the index with `mmssl index`)")
    try:
        meta = json.loads(read_text(meta_path))
    except json.JSONDecodeError as err:
        raise DataError(f"{meta_path}: not JSON: {err}") from None
    if not isinstance(meta, dict):
        raise DataError(f"{meta_path}: not an index description (a JSON object)")
    _check_checksums(index_dir, meta)
    embeddings = read_embeddings(index_dir / f"{IMAGES}.safetensors")
    rows = read_jsonl(index_dir / f"{IMAGES}.jsonl")
    if embeddings.shape[0] != len(rows):
        raise DataError(
            f"{index_dir}: {embeddings.shape[0]} image embeddings but {len(rows)} lines in {IMAGES}.jsonl"
        )
    expected = (meta.get("images", len(rows)), meta.get("dim", embeddings.shape[1]))
    if tuple(embeddings.shape) != tuple(expected):
        raise DataError(
            f"{index_dir}: {IMAGES}.safetensors holds {tuple(embeddings.shape)} embeddings but "
            f"{INDEX_FILE} says {expected[0]} images of dimension {expected[1]} (a mix of two indexes); "
            "make the index again with `mmssl index`"
        )
    return meta, embeddings, rows


def _check_checksums(index_dir: Path, meta: dict) -> None:
    """The embeddings must still be the ones ``index.json`` records the checksum of (``files``;
    indexes made before it was recorded have none). The rows (``images.jsonl``) are checked by
    their count: a user may mend the image paths of a moved corpus there."""
    files = meta.get("files") or {}
    for name in (f"{IMAGES}.safetensors", FAISS_FILE):
        path = index_dir / name
        if name in files and path.is_file() and sha256_file(path) != files[name]:
            raise DataError(
                f"{path}: not the file {INDEX_FILE} describes (its sha256 differs: the folder mixes two "
                "indexes); make the index again with `mmssl index`"
            )


def query_model(meta: dict, checkpoint: str | None, device: torch.device) -> tuple[LoadedRun, list[str]]:
    """The run that embeds the queries, and notes when its weights differ from the index's."""
    notes = []
    index_weights = Path(meta["weights"])
    if checkpoint is None and not index_weights.is_file():
        checkpoint = meta["run"]
        notes.append(
            f"the index's checkpoint {index_weights} is gone; "
            f"queries use the latest checkpoint of {checkpoint}"
        )
    loaded = load_run(checkpoint if checkpoint is not None else index_weights, device)
    if sha256_file(loaded.weights) != meta.get("weights_sha256"):
        notes.append(
            f"the index was made with other weights ({index_weights}, step {meta.get('step')}) than "
            f"these queries use ({loaded.weights}, step {loaded.step}); scores compare two different "
            "models: run `mmssl index` again"
        )
    elif checkpoint is None:
        try:
            latest = resolve_weights(loaded.run_dir).resolve()
        except DataError:
            latest = loaded.weights
        if latest != loaded.weights:
            notes.append(
                f"the run has a newer checkpoint ({latest}) than the index's ({loaded.weights}); "
                "queries use the index's: run `mmssl index` again to use it"
            )
    return loaded, notes


def top_images(
    queries: Tensor, images: Tensor, rows: Sequence[dict], top: int, search: ImageSearch | None = None
) -> list[list[dict]]:
    """For each query ``(Q, D)``, the ``top`` best of ``images (N, D)`` by cosine score, found
    by ``search`` when given (the index's FAISS index: ``mmssl index --faiss``)."""
    if search is not None:
        found_scores, found_rows = search.search(queries, top)
        values, indices = torch.from_numpy(found_scores), torch.from_numpy(found_rows)
    else:
        scores = queries.float() @ images.float().T  # (Q, N)
        values, indices = scores.topk(min(top, images.shape[0]), dim=1)
    return [
        [
            {
                "rank": r + 1,
                "score": round(float(v), 4),
                "group": rows[i].get("group"),
                "image": rows[i].get("image"),
                "captions": rows[i].get("captions", []),
            }
            for r, (v, i) in enumerate(zip(vs.tolist(), ix.tolist()))
            if i >= 0  # an approximate index may find fewer than asked
        ]
        for vs, ix in zip(values, indices)
    ]


MISSING_TILE = (128, 128, 128)  # the grey thumbnail of an indexed image that is no longer readable


def contact_sheet(results: Sequence[dict], path: Path, index_dir: str | Path = "") -> list[str]:
    """A PNG with a row per query: its top images as thumbnails labelled ``rank: score``. An
    indexed image that cannot be read any more (moved, deleted) gets a grey tile; returns a note
    naming each such image and the index."""
    columns = max(len(r["results"]) for r in results)
    sheet = Image.new("RGB", (columns * THUMB, len(results) * (THUMB + LABEL)), "white")
    draw = ImageDraw.Draw(sheet)
    notes: dict[str, str] = {}
    for row, result in enumerate(results):
        top = row * (THUMB + LABEL)
        for col, hit in enumerate(result["results"]):
            try:
                with Image.open(hit["image"]) as img:
                    sheet.paste(img.convert("RGB").resize((THUMB, THUMB)), (col * THUMB, top))
            except (OSError, UnidentifiedImageError) as err:
                sheet.paste(Image.new("RGB", (THUMB, THUMB), MISSING_TILE), (col * THUMB, top))
                notes[hit["image"]] = (
                    f"{hit['image']} (image of index {index_dir}) cannot be read "
                    f"({type(err).__name__}): a grey tile in {path}"
                )
            draw.text((col * THUMB + 4, top + THUMB + 3), f"{hit['rank']}: {hit['score']:.3f}", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return list(notes.values())
