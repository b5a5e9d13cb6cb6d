"""Nearest images of a query embedding: exact inner product, or an approximate FAISS index for
large collections (``mmssl index --faiss``), read back by ``mmssl serve``.

Embeddings are L2-normalised, so the inner product is the cosine score. Kinds:

    exact   faiss ``IndexFlatIP``: every image scored; right up to ~100k images on a CPU (made
            in memory from ``images.safetensors``: no file of its own)
    hnsw    ``IndexHNSWFlat`` (Malkov & Yashunin, 2018; M=32, efConstruction=80, efSearch=128):
            a graph walk, sub-millisecond at 1M images, recall@10 ~0.95+
    ivf     ``IndexIVFFlat``: 4*sqrt(N) k-means cells, the query's nprobe=32 nearest scanned

``auto`` picks ``exact`` below ``EXACT_UP_TO`` images and ``hnsw`` above (BENCHMARKS.md,
"Search service": where exact search stops answering in milliseconds on 2 cores). The index
reports the approximate kind's recall@10 against exact search on its own spoken captions.

Shape legend: Q queries, N indexed images, D embedding dim.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from torch import Tensor

from mmssl.errors import ConfigError, DataError
from mmssl.files import atomic_path

FAISS_FILE = "images.faiss"
KINDS = ("auto", "exact", "hnsw", "ivf")
EXACT_UP_TO = 100_000  # auto: exact search below this many images, hnsw from here
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 80, 128
IVF_NPROBE = 32
RECALL_K = 10
RECALL_QUERIES = 1000  # queries that measure an approximate index's recall against exact


def choose_kind(kind: str, images: int) -> str:
    """The kind ``mmssl index --faiss KIND`` builds for ``images`` images."""
    if kind not in KINDS:
        raise ConfigError(f"--faiss must be one of {', '.join(KINDS)}; got {kind!r}")
    if kind == "auto":
        return "exact" if images < EXACT_UP_TO else "hnsw"
    return kind


def _matrix(embeddings: Tensor | np.ndarray) -> np.ndarray:
    array = embeddings.numpy() if isinstance(embeddings, Tensor) else embeddings
    return np.ascontiguousarray(array, dtype=np.float32)


def build_faiss(embeddings: Tensor | np.ndarray, kind: str, seed: int = 0) -> faiss.Index:
    """A FAISS inner-product index of ``embeddings (N, D)`` of ``kind`` (exact, hnsw, ivf)."""
    x = _matrix(embeddings)
    n, dim = x.shape
    if kind == "exact":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.hnsw.efSearch = HNSW_EF_SEARCH
    elif kind == "ivf":
        cells = max(1, min(int(4 * n**0.5), n // 39 or 1))  # faiss wants >= 39 training points a cell
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, cells, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.train(x)
        index.nprobe = min(IVF_NPROBE, cells)
    else:
        raise ConfigError(f"no FAISS index of kind {kind!r} (exact, hnsw, ivf)")
    index.add(x)
    return index


def write_faiss(index: faiss.Index, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))


def read_faiss(path: str | os.PathLike) -> faiss.Index:
    try:
        return faiss.read_index(str(path))
    except RuntimeError as err:
        raise DataError(f"{path}: cannot read the FAISS index ({str(err).splitlines()[0]})") from None


def kind_of(index: faiss.Index) -> str:
    if isinstance(index, faiss.IndexHNSW):
        return "hnsw"
    if isinstance(index, faiss.IndexIVF):
        return "ivf"
    return "exact"


def recall_against_exact(
    index: faiss.Index, embeddings: Tensor | np.ndarray, queries: Tensor | np.ndarray, k: int = RECALL_K
) -> float:
    """The fraction of each query's exact top ``k`` (capped at N) that ``index`` also returns,
    averaged over at most ``RECALL_QUERIES`` of ``queries (Q, D)``."""
    x, q = _matrix(embeddings), _matrix(queries)[:RECALL_QUERIES]
    k = min(k, x.shape[0])
    exact = faiss.IndexFlatIP(x.shape[1])
    exact.add(x)
    _, truth = exact.search(q, k)
    _, found = index.search(q, k)
    hits = sum(len(set(t.tolist()) & set(f.tolist())) for t, f in zip(truth, found))
    return hits / (k * len(q))


@dataclass
class ImageSearch:
    """The images of an index, searchable: a FAISS index when the index has one, else an exact
    one made in memory from ``embeddings (N, D)``."""

    index: faiss.Index
    size: int
    dim: int

    @classmethod
    def open(cls, embeddings: Tensor, index_dir: str | os.PathLike | None = None) -> ImageSearch:
        path = Path(index_dir) / FAISS_FILE if index_dir is not None else None
        if path is not None and path.is_file():
            index = read_faiss(path)
            if (index.ntotal, index.d) != tuple(embeddings.shape):
                raise DataError(
                    f"{path}: holds {index.ntotal} vectors of dimension {index.d}, the index "
                    f"{tuple(embeddings.shape)}; make the index again with `mmssl index`"
                )
        else:
            index = build_faiss(embeddings, "exact")
        return cls(index, int(embeddings.shape[0]), int(embeddings.shape[1]))

    @property
    def kind(self) -> str:
        return kind_of(self.index)

    def search(self, queries: Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores (Q, k'), rows (Q, k'))`` best first, ``k' = min(k, N)``."""
        q = _matrix(queries.float())
        if q.shape[1] != self.dim:
            raise DataError(f"queries are {q.shape[1]}-d, the index's images {self.dim}-d")
        scores, rows = self.index.search(q, min(k, self.size))
        return scores, rows
