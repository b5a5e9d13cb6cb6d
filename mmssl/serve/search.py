"""What ``mmssl serve`` holds in memory: an index (``mmssl index``), the run that embeds its
queries, loaded once, and the files a request may name.

A request names an item by its id (an image's group, a spoken caption's id); the only files
served are those ``images.jsonl`` and ``speech.jsonl`` list, looked up by id in a table made
at start-up, so no request can name a path.

The model runs in at most ``lanes`` threads at once. On a CPU ``mmssl serve`` gives each core a
lane of one torch thread: a short query's small matrix products use one thread better than
two, and the lanes share one queue, oldest first, so no query waits behind another while a
core is free
(BENCHMARKS.md, "Search service": 2 lanes answer about twice the queries of one lane of two
threads). On a GPU one lane: the device runs one batch at a time anyway. Spoken queries that
arrive while every lane is busy wait together and go through as one padded batch (at most
``max_batch``; padding never changes an embedding): on a GPU a queue of N then costs little
more than one query; on 2 CPU cores it measured no faster than one at a time, so ``mmssl
serve`` batches only on a GPU unless told.

Shape legend: S samples, D embedding dim.
"""

from __future__ import annotations

import mimetypes
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import torch
from torch import Tensor

from mmssl.constants import SAMPLE_RATE
from mmssl.errors import ConfigError, DataError
from mmssl.eval.query import query_model, read_index
from mmssl.eval.retrieval import SPEECH, QueryLimits, embed_texts, embed_waveforms, read_jsonl
from mmssl.eval.search import ImageSearch
from mmssl.serve.embedders import Embedders
from mmssl.serve.quantize import quantize_int8


@dataclass
class Item:
    """A file the service may send: an indexed image or a spoken caption."""

    path: Path
    kind: str  # "image" | "audio"

    @property
    def media_type(self) -> str:
        return mimetypes.guess_type(self.path.name)[0] or "application/octet-stream"


MAX_BATCH = 8  # spoken queries embedded together at most (mmssl serve --max-batch)
LANE_IDLE_S = 10.0  # a lane thread without a query for this long ends


@dataclass
class _Job:
    wave: Tensor
    name: str
    embedding: Tensor | None = None
    error: DataError | None = None
    done: threading.Event = field(default_factory=threading.Event)


@dataclass
class SearchService:
    index_dir: Path
    meta: dict
    rows: list[dict]  # one per image: group, image, captions
    captions: dict[str, list[dict]]  # group -> its spoken captions: id, text
    items: dict[str, Item]
    search: ImageSearch
    objective: torch.nn.Module
    device: torch.device
    notes: list[str] = field(default_factory=list)
    max_batch: int = MAX_BATCH
    lanes: int = 1  # model calls at once
    linear: str = "float"  # the model's linear layers: float | int8 (quantize_int8)
    embedders: Embedders | None = None  # processes that embed spoken queries, or None: this one
    waiting: list[_Job] = field(default_factory=list)  # spoken queries not yet embedded, oldest first

    def __post_init__(self) -> None:
        self.lane = threading.BoundedSemaphore(self.lanes)  # held while a model call runs
        self.arrived = threading.Condition()  # guards ``waiting`` and ``workers``
        self.workers = 0  # lane threads running (``_work``), at most ``lanes``

    @property
    def has_text(self) -> bool:
        return getattr(self.objective, "text_tower", None) is not None

    def describe(self) -> dict:
        """What ``GET /health`` and the page show: model, index size, search kind."""
        return {
            "status": "ok",
            "model": {
                "run": Path(self.meta.get("run", "")).name,
                "step": self.meta.get("step"),
                "dim": self.search.dim,
                "text_queries": self.has_text,
                "linear_layers": self.linear,
            },
            "index": {
                "folder": self.index_dir.name,
                "images": self.search.size,
                "captions": sum(len(c) for c in self.captions.values()),
                "search": self.search.kind,
            },
            "embedders": self.embedders.describe() if self.embedders is not None else None,
            "notes": self.notes,
        }

    def embed_audio(self, wave: Tensor, name: str, warnings: list[str]) -> Tensor:
        """``wave (S,)`` at 16 kHz -> ``(1, D)``, batched with the queries waiting beside it;
        a silent clip adds a warning, and one too short to embed is a ``DataError``.

        The query joins the queue and its thread sleeps until a lane thread has embedded it:
        lanes take the oldest queries first, and each asker wakes as soon as its own answer is
        there. (Askers that took turns at the model themselves woke only when they next got a
        lane, after embedding someone else's query: at 20 clients on 2 cores, p5 / p95 latency
        97 / 306 ms before, 187 / 272 ms after; BENCHMARKS.md, "Queries answered oldest
        first".)"""
        limits = QueryLimits(max_seconds=wave.shape[0] / SAMPLE_RATE + 1.0, warn=warnings.append)
        job = _Job(limits.apply(wave, name), name)
        with self.arrived:
            self.waiting.append(job)
            if self.workers < self.lanes:
                self.workers += 1
                threading.Thread(target=self._work, name="mmssl-lane", daemon=True).start()
            else:
                self.arrived.notify()
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.embedding

    def _work(self) -> None:
        """One lane: embed the oldest waiting queries (at most ``max_batch`` at a time) while
        there are any; the thread ends after ``LANE_IDLE_S`` without one (the next query starts
        another), so a service that is no longer used holds no thread."""
        while True:
            with self.arrived:
                if not self.arrived.wait_for(lambda: self.waiting, LANE_IDLE_S):
                    self.workers -= 1
                    return
            with self.lane:
                with self.arrived:
                    batch, self.waiting = self.waiting[: self.max_batch], self.waiting[self.max_batch :]
                if batch:
                    self._embed_batch(batch)

    def _embed_batch(self, batch: list[_Job]) -> None:
        """Embed ``batch``, each job done with its embedding or its error (never left waiting)."""
        waves, names = [j.wave for j in batch], [j.name for j in batch]
        try:
            if self.embedders is not None:
                out = self.embedders.embed(waves, names)
            else:
                out = embed_waveforms(self.objective, waves, len(batch), self.device, False, names)
        except DataError as err:  # a clip too short: embed each alone, so only its own query fails
            if len(batch) > 1:
                for job in batch:
                    self._embed_batch([job])
                return
            out, batch[0].error = None, err
        except Exception as err:  # a bug: every query of the batch fails with it, none hangs
            out = None
            for job in batch:
                job.error = err
        for i, job in enumerate(batch):
            job.embedding = out[i : i + 1] if out is not None else None
            job.done.set()

    def embed_text(self, text: str) -> Tensor:
        if not self.has_text:
            raise ConfigError(
                "this index's run has no text tower: text queries need a model trained with "
                "objective.caption_weight > 0"
            )
        with self.lane:
            return embed_texts(self.objective, [text], 1, self.device)

    def top(self, query: Tensor, k: int) -> tuple[list[dict], float]:
        """The ``k`` best images of ``query (1, D)`` as JSON rows, and the search time in ms."""
        start = time.perf_counter()
        scores, rows = self.search.search(query, k)
        search_ms = 1000 * (time.perf_counter() - start)
        results = []
        for score, row in zip(scores[0].tolist(), rows[0].tolist()):
            if row < 0:  # an approximate index found fewer than k
                continue
            group = str(self.rows[row]["group"])
            results.append(
                {
                    "rank": len(results) + 1,
                    "id": group,
                    "score": round(float(score), 4),
                    "image": f"/items/{quote(group, safe='')}",
                    "captions": [
                        {"id": c["id"], "text": c["text"], "audio": f"/items/{quote(c['id'], safe='')}"}
                        for c in self.captions.get(group, [])
                    ],
                }
            )
        return results, search_ms


def open_service(
    index_dir: str | Path,
    device: torch.device,
    checkpoint: str | None = None,
    max_batch: int = MAX_BATCH,
    lanes: int = 1,
    quantize: str | None = None,
    embedders: int = 0,
) -> SearchService:
    """Read the index, load its run and make the table of files the service may send;
    ``quantize="int8"`` runs the model's linear layers in int8 (a CPU only); ``embedders`` > 0
    starts that many processes that embed spoken queries (a CPU only; they set ``lanes``)."""
    index_dir = Path(index_dir)
    if quantize not in (None, "int8"):
        raise ConfigError(f"quantize must be int8 or none; got {quantize!r}")
    if embedders and device.type != "cpu":
        raise ConfigError(f"--embedders runs on a CPU only; the device is {device}")
    if quantize is not None and device.type != "cpu":
        raise ConfigError(
            f"--quantize {quantize} runs on a CPU only (PyTorch's int8 kernels); the device is {device}"
        )
    meta, embeddings, rows = read_index(index_dir)
    search = ImageSearch.open(embeddings, index_dir)
    loaded, notes = query_model(meta, checkpoint, device)
    if loaded.objective.dim != search.dim:
        raise DataError(
            f"{index_dir}: image embeddings are {search.dim}-d, the run's {loaded.objective.dim}-d "
            "(an index of another model)"
        )
    objective = quantize_int8(loaded.objective) if quantize == "int8" else loaded.objective
    speech_path = index_dir / f"{SPEECH}.jsonl"
    speech = read_jsonl(speech_path) if speech_path.is_file() else []
    items: dict[str, Item] = {}
    captions: dict[str, list[dict]] = {}
    for row in rows:
        items.setdefault(str(row["group"]), Item(Path(row["image"]), "image"))
    for row in speech:
        if row.get("id") is None or not row.get("audio"):
            continue
        cid = str(row["id"])
        if cid in items:  # an image's group of the same name: the image keeps the id
            continue
        items[cid] = Item(_absolute(row["audio"], meta), "audio")
        captions.setdefault(str(row.get("group")), []).append({"id": cid, "text": row.get("caption") or ""})
    pool = Embedders(embedders, meta, checkpoint, quantize) if embedders else None
    lanes = pool.in_flight if pool is not None else lanes  # lane threads only hand queries over
    return SearchService(
        index_dir,
        meta,
        rows,
        captions,
        items,
        search,
        objective,
        device,
        notes,
        max_batch,
        lanes,
        quantize or "float",
        pool,
    )


def _absolute(path: str, meta: dict) -> Path:
    """A caption's audio path as the manifest gave it, relative to the manifest's folder."""
    p = Path(path)
    if p.is_absolute() or not meta.get("manifest"):
        return p
    return Path(meta["manifest"]).parent / p
