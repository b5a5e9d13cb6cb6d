"""Processes that embed spoken queries for ``mmssl serve --embedders N``, fed from one queue.

The server process keeps HTTP, decoding and image search; each embedder holds its own copy of
the model on one torch thread and takes the oldest waiting batch, with the next one already
queued in its pipe (``IN_FLIGHT``), so a core never waits for the server between queries.
Pre-forked server processes (``--workers``) split the clients instead: a keep-alive
connection stays with the process that accepted it, and asyncio accepts every pending
connection in one go, so one process can end up with most of the clients while the
other idles (BENCHMARKS.md, "Search service": with 2 such processes the median query took 88 ms
and the 95th percentile 400). An embedder also runs the model outside the server's GIL: in one
process, two model threads (``--threads 2``) answered 77 int8 queries/s on 2 cores where two
embedders answered 107-114 (150-160 now, each with its next query queued); the model's Python
and the int8 linear's op dispatch hold the GIL.

Waveforms go to an embedder as float32 arrays and embeddings come back the same way (a
4-s query is 256 KB through a pipe, well under a millisecond); a clip too short to embed comes
back as the ``DataError`` naming it. An embedder that dies (the OOM killer, a crash) breaks
the whole pool, as ``ProcessPoolExecutor`` does: the pool is started again once and the batch
retried, so the queries in flight and later ones still get answers. Each embedder leaves as
soon as the server process is gone, however that ended (SIGTERM, SIGKILL), so none is left
behind holding its copy of the model.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from threading import BrokenBarrierError

import numpy as np
import torch

from mmssl.errors import ConfigError
from mmssl.eval.query import query_model
from mmssl.eval.retrieval import embed_waveforms
from mmssl.serve.lifetime import watch_parent
from mmssl.serve.quantize import quantize_int8

# embedders run at a lower priority than the server process, so that on a saturated CPU the
# requests are read, decoded and answered promptly and wait in the queue (in order) rather than
# in the scheduler: 20 clients on 2 cores, p95 307 ms instead of 372 (BENCHMARKS.md)
NICE = 10
# queries handed to each embedder at once: the one it embeds and the next, already in its pipe,
# so it starts the next as soon as it answers instead of idling until a lane thread of the busy
# server process (its GIL) hands it one; 20 clients on 2 cores, 117 -> 140 queries/s
# (BENCHMARKS.md, "Each embedder keeps its next query queued")
IN_FLIGHT = 2
LOAD_TIMEOUT = 300.0  # seconds for every embedder to load the run

_model = None  # in each embedder process: the objective that embeds queries
_loaded = None  # in each embedder process: the barrier all of them pass once loaded


def _load(meta: dict, checkpoint: str | None, quantize: str | None, barrier, parent: int) -> None:
    """Initializer of an embedder process: one torch thread, the run loaded once."""
    global _model, _loaded
    watch_parent(parent)
    _loaded = barrier
    torch.set_num_threads(1)
    os.nice(NICE)
    run, _ = query_model(meta, checkpoint, torch.device("cpu"))
    _model = quantize_int8(run.objective) if quantize == "int8" else run.objective


def _ready() -> int:
    """Held until every embedder runs it, so each of ``count`` calls lands in its own process;
    its pid."""
    _loaded.wait()
    return os.getpid()


def _embed(waves: list[np.ndarray], names: list[str]) -> np.ndarray:
    tensors = [torch.from_numpy(w) for w in waves]
    return embed_waveforms(_model, tensors, len(tensors), torch.device("cpu"), False, names).numpy()


class Embedders:
    """``count`` embedder processes (spawned: torch is not fork-safe), loaded before this
    returns (a ``ConfigError`` when they cannot load); ``embed`` blocks the calling thread until
    one of them has the answer. ``in_flight`` calls at once keep every embedder busy
    (``IN_FLIGHT`` each), and the pool hands them out in the order they were made."""

    def __init__(self, count: int, meta: dict, checkpoint: str | None, quantize: str | None) -> None:
        self.count, self.meta, self.checkpoint, self.quantize = count, meta, checkpoint, quantize
        self.in_flight = count * IN_FLIGHT
        self.restarts = 0
        self.lock = threading.Lock()  # held while a broken pool is replaced
        self.pool, self.pids = self._start()

    def _start(self) -> tuple[ProcessPoolExecutor, list[int]]:
        ctx = mp.get_context("spawn")
        barrier = ctx.Barrier(self.count, timeout=LOAD_TIMEOUT)
        pool = ProcessPoolExecutor(
            self.count,
            mp_context=ctx,
            initializer=_load,
            initargs=(self.meta, self.checkpoint, self.quantize, barrier, os.getpid()),
        )
        # every process started and loaded before the first query: a load error surfaces here
        try:
            pids = [future.result() for future in [pool.submit(_ready) for _ in range(self.count)]]
        except (BrokenProcessPool, BrokenBarrierError) as err:
            pool.shutdown(wait=False, cancel_futures=True)
            raise ConfigError(
                f"--embedders {self.count}: an embedder could not load the run within "
                f"{LOAD_TIMEOUT:g} s ({type(err).__name__}; its error is printed above)"
            ) from None
        return pool, sorted(pids)

    def embed(self, waves: list[torch.Tensor], names: list[str]) -> torch.Tensor:
        arrays = [w.numpy().astype(np.float32, copy=False) for w in waves]
        pool = self.pool
        try:
            return torch.from_numpy(pool.submit(_embed, arrays, names).result())
        except BrokenProcessPool:  # an embedder died: start them again, and try once more
            self._restart(pool)
            return torch.from_numpy(self.pool.submit(_embed, arrays, names).result())

    def _restart(self, broken: ProcessPoolExecutor) -> None:
        with self.lock:
            if self.pool is broken:  # not yet replaced by another query's thread
                broken.shutdown(wait=False, cancel_futures=True)
                self.pool, self.pids = self._start()
                self.restarts += 1

    def describe(self) -> dict:
        return {
            "processes": self.count,
            "pids": self.pids,
            "restarts": self.restarts,
            "in_flight": self.in_flight,
        }

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
