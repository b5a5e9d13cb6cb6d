"""Processes that embed spoken queries for ``mmssl serve --embedders N``, fed from one queue.

The server process keeps HTTP, decoding and image search; each embedder holds its own copy of
the model on one torch thread and takes the next waiting batch, so a free core always takes
the oldest query. Pre-forked server processes (``--workers``) split the clients instead: a
keep-alive connection stays with the process that accepted it, and asyncio accepts every
pending connection in one go, so one process can end up with most of the clients while the
other idles (BENCHMARKS.md, "Search service": with 2 such processes the median query took 88 ms
and the 95th percentile 400). An embedder also runs the model outside the server's GIL: in one
process, two model threads (``--threads 2``) answered 77 int8 queries/s on 2 cores where two
embedders answer 107-114; the model's Python and the int8 linear's op dispatch hold the GIL.

Waveforms go to an embedder as float32 arrays and embeddings come back the same way (a
4-s query is 256 KB through a pipe, well under a millisecond); a clip too short to embed comes
back as the ``DataError`` naming it.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch

from mmssl.eval.query import query_model
from mmssl.eval.retrieval import embed_waveforms
from mmssl.serve.quantize import quantize_int8

# embedders run at a lower priority than the server process, so that on a saturated CPU the
# requests are read, decoded and answered promptly and wait in the queue (in order) rather than
# in the scheduler: 20 clients on 2 cores, p95 307 ms instead of 372 (BENCHMARKS.md)
NICE = 10
LOAD_TIMEOUT = 300.0  # seconds for every embedder to load the run

_model = None  # in each embedder process: the objective that embeds queries
_loaded = None  # in each embedder process: the barrier all of them pass once loaded


def _load(meta: dict, checkpoint: str | None, quantize: str | None, barrier) -> None:
    """Initializer of an embedder process: one torch thread, the run loaded once."""
    global _model, _loaded
    _loaded = barrier
    torch.set_num_threads(1)
    os.nice(NICE)
    run, _ = query_model(meta, checkpoint, torch.device("cpu"))
    _model = quantize_int8(run.objective) if quantize == "int8" else run.objective


def _ready() -> None:
    """Held until every embedder runs it, so each of ``count`` calls lands in its own process."""
    _loaded.wait()


def _embed(waves: list[np.ndarray], names: list[str]) -> np.ndarray:
    tensors = [torch.from_numpy(w) for w in waves]
    return embed_waveforms(_model, tensors, len(tensors), torch.device("cpu"), False, names).numpy()


class Embedders:
    """``count`` embedder processes (spawned: torch is not fork-safe), loaded before this
    returns; ``embed`` blocks the calling thread until one of them has the answer."""

    def __init__(self, count: int, meta: dict, checkpoint: str | None, quantize: str | None) -> None:
        self.count = count
        ctx = mp.get_context("spawn")
        loaded = ctx.Barrier(count, timeout=LOAD_TIMEOUT)
        self.pool = ProcessPoolExecutor(
            count, mp_context=ctx, initializer=_load, initargs=(meta, checkpoint, quantize, loaded)
        )
        # every process started and loaded before the first query: a load error surfaces here
        try:
            for future in [self.pool.submit(_ready) for _ in range(count)]:
                future.result()
        except BaseException:
            self.close()
            raise

    def embed(self, waves: list[torch.Tensor], names: list[str]) -> torch.Tensor:
        arrays = [w.numpy().astype(np.float32, copy=False) for w in waves]
        return torch.from_numpy(self.pool.submit(_embed, arrays, names).result())

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
