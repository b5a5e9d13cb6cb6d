"""Speech-image retrieval: recall@K, embedding a run's towers, and the index that ``mmssl index``
(``mmssl.commands.index``) builds and ``mmssl retrieve`` (``mmssl.eval.query``) reads.

``RUN``: a ``speech_image`` run folder (its latest checkpoint), a checkpoint folder or a
``.safetensors`` file. Every distinct image of the manifest (one per ``group``; records
without a group are grouped by image path, ``record_group``) and every spoken caption are embedded with the
run's towers, in padded batches (a caption's embedding does not depend on its batch). Writes::

    INDEX_DIR/images.safetensors   "embeddings" (N_images, D), L2-normalised
    INDEX_DIR/images.jsonl         per row: group, image (absolute path), captions (texts)
    INDEX_DIR/speech.safetensors   "embeddings" (N_captions, D)
    INDEX_DIR/speech.jsonl         per row: id, audio, group, caption
    INDEX_DIR/images.faiss         an approximate FAISS index of the images (``--faiss hnsw|ivf``,
                                   or ``auto`` from 100k images: ``mmssl.eval.search``)
    INDEX_DIR/index.json           run, weights file, step, its sha256, manifest, dim, counts,
                                   the sha256 of the files above ("files"), and the search
                                   kind with its recall@10 against exact search ("search")
    INDEX_DIR/recall.json          recall@K both directions, chance levels, and warnings (a single
                                   image; a K that reaches the number of candidates)
    INDEX_DIR/recall.md            the same as a Markdown table
    INDEX_DIR/recall_at_k.png      recall against K, both directions

The folder is written whole (``mmssl.files.atomic_dir``): an interrupted index leaves the
previous one untouched, never a mix of two.

Recall@K with several captions per image (Harwath et al., 2018; SpeechCLIP): speech->image, a
caption's query is answered when its own image is among the top K images; image->speech, an
image's query is answered when any of its captions is among the top K captions. Ties count
against the query (an irrelevant item scoring the same as the best relevant one is ranked
before it), so constant embeddings give no more than chance.

Shape legend: Q queries, N candidates, D embedding dim, S samples.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm import tqdm

from mmssl.constants import SAMPLE_RATE
from mmssl.data.check import SILENCE_PEAK
from mmssl.data.collate import pad_sequences
from mmssl.data.io import load_image
from mmssl.data.manifest import read_manifest
from mmssl.data.store import record_audio
from mmssl.errors import ConfigError, DataError
from mmssl.eval.report import line_plot
from mmssl.eval.search import FAISS_FILE, build_faiss, choose_kind, recall_against_exact, write_faiss
from mmssl.files import atomic_dir, atomic_path, check_replaceable, read_text, sha256_file, write_text
from mmssl.runs import load_objective_from_run, run_dir_of, step_of
from mmssl.tables import markdown_table

KS = (1, 5, 10)
INDEX_FILE = "index.json"
IMAGES, SPEECH = "images", "speech"
INDEX_DATA = tuple(f"{n}.{ext}" for n in (IMAGES, SPEECH) for ext in ("safetensors", "jsonl"))
DIRECTIONS = {"speech_to_image": "speech → image", "image_to_speech": "image → speech"}


# --- recall@K ------------------------------------------------------------------------------


def first_relevant_rank(scores: Tensor, relevant: Tensor) -> Tensor:
    """``scores (Q, N)``, ``relevant (Q, N)`` bool -> ``(Q,)`` 0-based rank of each query's best
    relevant candidate: the number of irrelevant candidates scoring at least as high."""
    if scores.shape != relevant.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and relevant {tuple(relevant.shape)} differ in shape")
    if not bool(relevant.any(1).all()):
        raise DataError(f"{int((~relevant.any(1)).sum())} queries have no relevant candidate")
    best = scores.masked_fill(~relevant, float("-inf")).max(1).values  # (Q,)
    return ((scores >= best.unsqueeze(1)) & ~relevant).sum(1)


def recall_at_k(scores: Tensor, relevant: Tensor, ks: Sequence[int] = KS) -> dict[int, float]:
    """The fraction of queries with a relevant candidate among their top ``k``, for each ``k``."""
    ranks = first_relevant_rank(scores, relevant)
    return {int(k): float((ranks < k).float().mean()) for k in ks}


def chance_recall(relevant: Tensor, ks: Sequence[int] = KS) -> dict[int, float]:
    """Expected recall@K of a random ranking: a query with ``r`` relevant candidates among
    ``n`` misses all of them in its top ``k`` with probability ``C(n - r, k) / C(n, k)``."""
    n, queries = relevant.shape[1], relevant.shape[0]
    counts = Counter(relevant.sum(1).tolist())  # relevant candidates per query -> queries
    out = {}
    for k in ks:
        kk = min(int(k), n)
        out[int(k)] = (
            sum(q * (1.0 - math.comb(n - r, kk) / math.comb(n, kk)) for r, q in counts.items()) / queries
        )
    return out


def group_relevance(query_groups: Sequence[str], candidate_groups: Sequence[str]) -> Tensor:
    """``(Q, N)`` bool: True where a query and a candidate share a group."""
    ids = {g: i for i, g in enumerate(dict.fromkeys([*query_groups, *candidate_groups]))}
    q = torch.tensor([ids[g] for g in query_groups])
    c = torch.tensor([ids[g] for g in candidate_groups])
    return q.unsqueeze(1) == c.unsqueeze(0)


def retrieval_recall(
    speech: Tensor,
    speech_groups: Sequence[str],
    images: Tensor,
    image_groups: Sequence[str],
    ks: Sequence[int] = KS,
) -> dict[str, dict[int, float]]:
    """Recall@K both ways from normalised ``speech (Q, D)`` and ``images (N, D)`` embeddings and
    their groups (a caption's group is its image's). Also gives each direction's chance level."""
    relevant = group_relevance(speech_groups, image_groups)  # (Q, N)
    scores = speech.float() @ images.float().T
    return {
        "speech_to_image": recall_at_k(scores, relevant, ks),
        "image_to_speech": recall_at_k(scores.T, relevant.T, ks),
        "chance_speech_to_image": chance_recall(relevant, ks),
        "chance_image_to_speech": chance_recall(relevant.T, ks),
    }


# --- a trained run -------------------------------------------------------------------------


@dataclass
class LoadedRun:
    """A ``speech_image`` objective with a checkpoint's weights, in eval mode."""

    objective: torch.nn.Module
    run_dir: Path
    weights: Path
    step: int | None


def load_run(run_or_ckpt: str | os.PathLike, device: torch.device = torch.device("cpu")) -> LoadedRun:
    """Rebuild a ``speech_image`` run's objective from its ``config.yaml`` and load the
    checkpoint (the latest for a run folder). The towers are built without the SSL run or CLIP
    file they started from (``speech_init`` / ``clip_pretrained``): the checkpoint holds them
    (``mmssl.runs``)."""
    path = Path(run_or_ckpt)
    if not path.exists():
        raise DataError(f"{path}: run or checkpoint not found")
    objective, weights = load_objective_from_run(path, expect="speech_image")
    run_dir = run_dir_of(weights.parent)
    return LoadedRun(objective.to(device).eval(), run_dir.resolve(), weights.resolve(), step_of(weights))


# --- embedding in batches ------------------------------------------------------------------


def _chunks(order: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(order), size):
        yield list(order[start : start + size])


def _load_audio(record: dict) -> Tensor:
    path = record.get("audio")
    if not path:
        raise DataError(f"record {record.get('id')!r} has no 'audio' path")
    try:
        return record_audio(record)  # a packed slice (`mmssl data pack`) or decoded
    except DataError as err:
        raise DataError(f"record {record.get('id')!r}: {err}") from None


def check_frames(objective, lens: Tensor, names: Sequence[str]) -> None:
    """A ``DataError`` naming every clip of ``lens (B,)`` too short for one frame of the speech
    encoder: alone it has no frame to pool, and in a padded batch it would embed as the bias of
    the projection alone, a vector that says nothing about the clip."""
    frames = objective.encoder.frame_spec(lens)  # a speech encoder's, or an audio-visual one's audio stream
    short = [(name, int(n)) for name, n, f in zip(names, lens.tolist(), frames.tolist()) if f < 1]
    if short:
        listed = ", ".join(f"{name} ({n} samples)" for name, n in short)
        raise DataError(
            f"{listed}: too short for one frame of the speech encoder (16 kHz audio; "
            "leave such clips out of the manifest)"
        )


@dataclass(frozen=True)
class QueryLimits:
    """What a speech query may be: at most ``max_seconds`` are embedded (the rest is cut off,
    saying so: an encoder's memory grows with the clip), and a clip whose peak stays under
    ``silence_peak`` is embedded with a warning (its ranking says nothing about speech).
    ``warn`` receives each message."""

    max_seconds: float = 30.0
    silence_peak: float = SILENCE_PEAK
    warn: Callable[[str], None] = print

    def apply(self, wave: Tensor, name: str) -> Tensor:
        limit = round(self.max_seconds * SAMPLE_RATE)
        if wave.shape[0] > limit:
            self.warn(
                f"{name} lasts {wave.shape[0] / SAMPLE_RATE:.1f} s: only its first {self.max_seconds:g} s "
                "are embedded (--max-seconds)"
            )
            wave = wave[:limit]
        if wave.numel() and float(wave.abs().max()) < self.silence_peak:
            self.warn(f"{name} is silent: the images ranked for it say nothing about speech")
        return wave


@torch.no_grad()
def _embed_speech(
    objective,
    load: Callable[[int], Tensor],
    sizes: Sequence[int],
    names: Sequence[str],
    batch_size: int,
    device: torch.device,
    progress: bool,
    limits: QueryLimits | None = None,
) -> Tensor:
    """``load(i) -> (S_i,)`` for ``i < len(sizes)`` -> normalised ``(Q, D)`` on the CPU, row ``i``
    for waveform ``i`` (``names[i]`` in errors). Batches hold waveforms of similar ``sizes``
    (sorted), padded, loaded one batch at a time; padding never changes an embedding. With
    ``limits`` (queries), long clips are cut and silent ones named."""
    out = torch.zeros(len(sizes), objective.dim)
    order = sorted(range(len(sizes)), key=lambda i: sizes[i])
    fit = (lambda i: limits.apply(load(i), names[i])) if limits is not None else load
    with tqdm(total=len(sizes), desc="speech", unit="utt", disable=not progress) as bar:
        for rows in _chunks(order, batch_size):
            audio, lens = pad_sequences([fit(i) for i in rows], 0.0)
            check_frames(objective, lens, [names[i] for i in rows])
            out[rows] = objective.embed_speech(audio.to(device), lens.to(device)).float().cpu()
            bar.update(len(rows))
    return out


def embed_waveforms(
    objective,
    waves: Sequence[Tensor],
    batch_size: int,
    device: torch.device,
    progress: bool = True,
    names: Sequence[str] | None = None,
    limits: QueryLimits | None = None,
) -> Tensor:
    """Waveforms ``(S_i,)`` at 16 kHz -> normalised ``(Q, D)`` on the CPU, in the given order;
    ``names`` (e.g. file paths) name a clip too short to embed (or cut or silent: ``limits``)."""
    names = names if names is not None else [f"waveform {i}" for i in range(len(waves))]
    sizes = [w.shape[0] for w in waves]
    return _embed_speech(objective, waves.__getitem__, sizes, names, batch_size, device, progress, limits)


def embed_speech_records(
    objective,
    records: Sequence[dict],
    batch_size: int,
    device: torch.device,
    progress: bool = True,
    limits: QueryLimits | None = None,
) -> Tensor:
    """The spoken captions of ``records`` -> normalised ``(Q, D)``, in manifest order (batched by
    the manifest's ``audio_samples``; audio is decoded one batch at a time)."""
    sizes = [int(r.get("audio_samples") or 0) for r in records]
    names = [f"record {r.get('id')!r} ({r.get('audio')})" for r in records]

    def load(i: int) -> Tensor:
        return _load_audio(records[i])

    return _embed_speech(objective, load, sizes, names, batch_size, device, progress, limits)


@torch.no_grad()
def embed_image_files(
    objective, paths: Sequence[str], batch_size: int, device: torch.device, progress: bool = True
) -> Tensor:
    """Image files -> normalised ``(N, D)`` on the CPU, through the objective's image transform."""
    out = torch.zeros(len(paths), objective.dim)
    with tqdm(total=len(paths), desc="images", unit="img", disable=not progress) as bar:
        for rows in _chunks(range(len(paths)), batch_size):
            pixels = torch.stack([objective.image_transform(load_image(paths[i])) for i in rows])
            out[rows] = objective.embed_image(pixels.to(device)).float().cpu()
            bar.update(len(rows))
    return out


@torch.no_grad()
def embed_texts(objective, texts: Sequence[str], batch_size: int, device: torch.device) -> Tensor:
    """Captions -> normalised ``(Q, D)`` through the text tower (``ConfigError`` without one)."""
    if getattr(objective, "text_tower", None) is None:
        raise ConfigError(
            "this run has no text tower: text queries need a model trained with objective.caption_weight > 0"
        )
    out = torch.zeros(len(texts), objective.dim)
    for rows in _chunks(range(len(texts)), batch_size):
        text, lens = objective.text_tokenizer.batch([texts[i] for i in rows])
        out[rows] = objective.embed_text(text.to(device), lens.to(device)).float().cpu()
    return out


# --- the index -----------------------------------------------------------------------------


def record_group(record: dict) -> str:
    """The image group of a manifest record: its ``group`` as ``collate`` writes it (``str``),
    or, without one, its image path (records of one file describe one image)."""
    group = record.get("group")
    return str(group) if group is not None and str(group) != "" else str(record["image"])


def distinct_images(records: Sequence[dict]) -> tuple[list[dict], list[str]]:
    """``(images, caption_groups)``: one row per distinct image (``group``, ``image`` path,
    ``captions``), in first-seen order, and each record's group. A record without ``group``
    is grouped by its image path; one group with two image paths is an error."""
    rows: dict[str, dict] = {}
    groups = []
    for record in records:
        image = record.get("image")
        if not image:
            raise DataError(f"record {record.get('id')!r} has no 'image' path")
        group = record_group(record)
        row = rows.setdefault(group, {"group": group, "image": str(image), "captions": []})
        if row["image"] != str(image):
            raise DataError(
                f"record {record.get('id')!r}: group {group!r} has two images, {row['image']} and {image}"
            )
        if record.get("caption"):
            row["captions"].append(record["caption"])
        groups.append(group)
    return list(rows.values()), groups


def _write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def _write_embeddings(path: Path, embeddings: Tensor) -> None:
    with atomic_path(path) as tmp:
        save_file({"embeddings": embeddings.float().contiguous()}, str(tmp))


def read_embeddings(path: str | os.PathLike) -> Tensor:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: not found (make the index with `mmssl index`)")
    try:
        return load_file(str(path))["embeddings"]
    except Exception as err:  # safetensors raises its own error types
        raise DataError(f"{path}: cannot read embeddings: {err}") from err


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: not found (make the index with `mmssl index`)")
    rows = []
    for n, line in enumerate(read_text(path).splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{n}: not JSON: {err}") from None
    return rows


def recall_table(recall: dict, ks: Sequence[int]) -> str:
    rows = [[label, *(100 * recall[key][k] for k in ks)] for key, label in DIRECTIONS.items()]
    rows += [
        [f"chance, {label}", *(100 * recall[f"chance_{key}"][k] for k in ks)]
        for key, label in DIRECTIONS.items()
    ]
    return markdown_table(["direction", *(f"R@{k} (%)" for k in ks)], rows, digits=1)


def recall_warnings(images: int, captions: int, ks: Sequence[int]) -> list[str]:
    """Why some recall@K of an index say nothing: a single image (every query finds it), or a K
    that reaches the number of candidates of a direction (recall@K is then 100 %, as chance)."""
    notes = []
    if images == 1:
        notes.append(
            "the manifest has a single image: speech -> image recall is 100 % at every K; "
            "index a manifest with many images (e.g. image/train.jsonl, or the demo corpus)"
        )
    for direction, candidates in (("speech -> image", images), ("image -> speech", captions)):
        reached = [k for k in ks if k >= candidates]
        if reached and not (images == 1 and direction == "speech -> image"):
            notes.append(
                f"{direction}: K = {', '.join(map(str, reached))} >= the {candidates} candidates: "
                "recall is 100 % there, as chance"
            )
    return notes


def write_recall(
    out: Path,
    speech: Tensor,
    speech_groups: Sequence[str],
    images: Tensor,
    image_groups: Sequence[str],
    ks: Sequence[int],
) -> dict:
    """``recall.json``, ``recall.md`` and ``recall_at_k.png`` in ``out``; returns the recall dict."""
    curve_ks = list(range(1, max(ks) + 1))  # every K up to the largest, for the plot
    curve = retrieval_recall(speech, speech_groups, images, image_groups, sorted({*curve_ks, *ks}))
    recall = {key: {k: value[k] for k in ks} for key, value in curve.items()}
    summary = {key: {f"R@{k}": round(v, 6) for k, v in value.items()} for key, value in recall.items()}
    summary.update(
        images=len(image_groups),
        captions=len(speech_groups),
        warnings=recall_warnings(len(image_groups), len(speech_groups), ks),
    )
    (out / "recall.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (out / "recall.md").write_text(recall_table(recall, ks) + "\n", encoding="utf-8")
    series = {label: [curve[key][k] for k in curve_ks] for key, label in DIRECTIONS.items()}
    series.update(
        {
            f"chance, {label}": [curve[f"chance_{key}"][k] for k in curve_ks]
            for key, label in DIRECTIONS.items()
        }
    )
    styles = {f"chance, {label}": ":" for label in DIRECTIONS.values()}
    line_plot(
        curve_ks,
        series,
        out / "recall_at_k.png",
        xlabel="K",
        ylabel="recall@K",
        title=f"{len(image_groups)} images, {len(speech_groups)} spoken captions",
        ylim=(0, 1.02),
        styles=styles,
    )
    return recall


def check_index_out(out: str | os.PathLike) -> Path:
    """``--out`` of ``mmssl index``: a new folder, an empty one or an index to replace (the index
    replaces its folder whole: ``mmssl.files.check_replaceable``)."""
    return check_replaceable(out, INDEX_FILE)


def build_index(
    loaded: LoadedRun,
    manifest: str | os.PathLike,
    out: str | os.PathLike,
    batch_size: int = 16,
    ks: Sequence[int] = KS,
    device: torch.device = torch.device("cpu"),
    progress: bool = True,
    faiss_kind: str = "auto",
) -> dict:
    """Embed ``manifest``'s images and spoken captions into ``out`` (layout in the module
    docstring); returns the recall dict of ``retrieval_recall``. The index is written into a
    temporary folder beside ``out`` that replaces it whole at the end: an index interrupted at
    any point leaves the previous one as it was, and ``index.json`` records the checksum of
    every embedding and row file, which ``mmssl retrieve`` checks. ``faiss_kind``
    (``mmssl.eval.search``): an approximate kind also writes ``images.faiss``, and ``index.json``
    records its recall@10 against exact search on the spoken captions."""
    out = check_index_out(out)
    records = read_manifest(manifest)
    if not records:
        raise DataError(f"{manifest}: the manifest has no records")
    images, caption_groups = distinct_images(records)
    kind = choose_kind(faiss_kind, len(images))
    objective = loaded.objective
    image_emb = embed_image_files(objective, [row["image"] for row in images], batch_size, device, progress)
    speech_emb = embed_speech_records(objective, records, batch_size, device, progress)
    with atomic_dir(out) as tmp:
        _write_embeddings(tmp / f"{IMAGES}.safetensors", image_emb)
        _write_jsonl(tmp / f"{IMAGES}.jsonl", images)
        _write_embeddings(tmp / f"{SPEECH}.safetensors", speech_emb)
        _write_jsonl(
            tmp / f"{SPEECH}.jsonl",
            [
                {"id": r.get("id"), "audio": r.get("audio"), "group": g, "caption": r.get("caption")}
                for r, g in zip(records, caption_groups)
            ],
        )
        files = list(INDEX_DATA)
        search = {"kind": kind, "recall_at_10_vs_exact": 1.0}
        if kind != "exact":
            approximate = build_faiss(image_emb, kind)
            write_faiss(approximate, tmp / FAISS_FILE)
            files.append(FAISS_FILE)
            recall = recall_against_exact(approximate, image_emb, speech_emb)
            search["recall_at_10_vs_exact"] = round(recall, 4)
        meta = {
            "run": str(loaded.run_dir),
            "weights": str(loaded.weights),
            "step": loaded.step,
            "weights_sha256": sha256_file(loaded.weights),
            "manifest": str(Path(manifest).resolve()),
            "dim": int(objective.dim),
            "images": len(images),
            "captions": len(records),
            "files": {name: sha256_file(tmp / name) for name in files},
            "search": search,
        }
        write_text(tmp / INDEX_FILE, json.dumps(meta, indent=2) + "\n")
        groups = [row["group"] for row in images]
        return write_recall(tmp, speech_emb, caption_groups, image_emb, groups, ks)
