"""k-means on whatever device the data lives on: torch on a GPU, scikit-learn's Lloyd on a CPU.

k-means++ seeding with greedy local trials (Arthur & Vassilvitskii, 2007; the greedy variant
of scikit-learn, ``2 + ln k`` candidates per step), then Lloyd iterations. Distances are one
GEMM per block of rows with the centroid norms fused in (``addmm``), so memory stays
``chunk x k`` whatever the number of points. On a CPU the Lloyd iterations run in
scikit-learn's compiled Lloyd step (``engine``; blocks of 256 rows, each thread its own
one-thread GEMM, row minimum and partial sums): 1.25-1.8x faster per iteration than faiss's
own k-means on 2 cores from 10^5 to 10^7 points (BENCHMARKS.md, "k-means").
HuBERT (Hsu et al., 2021, sec. IV-B) fits on a random subset of frames and
then assigns every frame; ``fit`` and ``predict`` are split for that.

``batch_size`` switches Lloyd for mini-batch k-means (Sculley, 2010), what HuBERT's
``simple_kmeans/learn_kmeans.py`` runs (scikit-learn ``MiniBatchKMeans``, ``batch_size=10000``,
``reassignment_ratio=0``): each step assigns a random batch and moves every centroid towards
its batch mean with a per-centroid rate of one over the points it has seen so far. k-means++
seeds on a random subset of ``3 * batch_size`` points (scikit-learn's ``init_size``).

Shape legend: N points, D dimensions, K clusters.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

from mmssl.errors import ConfigError


def _chunk_rows(k: int, device: torch.device) -> int:
    """Rows per distance block. On a CPU about 2^19 floats (2 MiB) of ``(rows, K)`` distances,
    so the block is still in cache when the row minimum reads it (measured, 10^6 x 39, K=100,
    2 cores: 0.26 s a Lloyd pass at 1,024-4,096 rows against 0.36 s at 65,536); on a GPU about
    2^23 floats (32 MiB), which keeps each GEMM large enough to fill the device."""
    budget = (1 << 19) if device.type == "cpu" else (1 << 23)
    return max(256, budget // max(k, 1))


def nearest(
    x: Tensor,
    centroids: Tensor,
    chunk: int | None = None,
    x_sq: Tensor | None = None,
    sums: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``x (N, D)``, ``centroids (K, D)`` -> (``labels (N,)`` long, ``sq_dist (N,)``) of the
    nearest centroid. ``x_sq (N,)``: the rows' squared norms when already known (Lloyd reuses
    them every iteration). ``sums (K, D)``: when given, each row is also added to its
    centroid's row of it, block by block while the block is in cache (Lloyd's update in the
    same pass over ``x``)."""
    chunk = chunk or _chunk_rows(centroids.shape[0], x.device)
    c_sq = centroids.pow(2).sum(1)  # (K,)
    c_t = centroids.T  # (D, K), a view: addmm reads it as a transposed operand
    labels = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    dists = torch.empty(x.shape[0], dtype=centroids.dtype, device=x.device)
    for start in range(0, x.shape[0], chunk):
        end = min(start + chunk, x.shape[0])
        part = x[start:end].to(centroids.dtype)
        # argmin_c ||x - c||^2 = argmin_c (||c||^2 - 2 x.c): one GEMM with the bias fused, one pass
        d = torch.addmm(c_sq, part, c_t, alpha=-2)  # (n, K)
        torch.min(d, 1, out=(dists[start:end], labels[start:end]))
        dists[start:end] += part.pow(2).sum(1) if x_sq is None else x_sq[start:end]
        if sums is not None:
            sums.index_add_(0, labels[start:end], part)
    return labels, dists.clamp_(min=0)  # clamped for rounding


def _nearest_split(
    x: Tensor,
    centroids: Tensor,
    chunk: int | None,
    x_sq: Tensor,
    sums: Tensor | None,
    pool: ThreadPoolExecutor,
    threads: int,
) -> tuple[Tensor, Tensor]:
    """``nearest`` on a CPU, the rows split into one part per thread of ``pool``, each part in
    one-thread torch operations (``sums``, when given, gets every part's sums): on 2 cores,
    10^6 x 39 and K=100, a pass takes 0.16 s against 0.29 s for the same operations each
    spread over both threads (too small for two threads to share well)."""
    n = x.shape[0]
    edges = [n * i // threads for i in range(threads + 1)]
    bounds = [(start, end) for start, end in zip(edges, edges[1:]) if end > start]

    def part(bound: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
        torch.set_num_threads(1)  # this worker thread's own setting
        start, end = bound
        own = None if sums is None else torch.zeros_like(sums)
        labels, dists = nearest(x[start:end], centroids, chunk, x_sq[start:end], sums=own)
        return labels, dists, own

    results = list(pool.map(part, bounds))
    for _, _, own in results:
        if own is not None:
            sums += own
    return torch.cat([r[0] for r in results]), torch.cat([r[1] for r in results])


def _sq_dist_to(x: Tensor, x_sq: Tensor, points: Tensor, chunk: int) -> Tensor:
    """``x (N, D)`` with its squared norms ``x_sq (N,)``, ``points (M, D)`` -> ``(N, M)``
    squared distances (M small)."""
    out = torch.empty(x.shape[0], points.shape[0], dtype=x.dtype, device=x.device)
    p_sq = points.pow(2).sum(1)
    for start in range(0, x.shape[0], chunk):
        torch.addmm(p_sq, x[start : start + chunk], points.T, alpha=-2, out=out[start : start + chunk])
    return out.add_(x_sq.unsqueeze(1)).clamp_(min=0)


def _sample_weighted(weights: Tensor, count: int, generator: torch.Generator | None) -> Tensor:
    """``count`` indices drawn with probability proportional to ``weights (N,)`` (any N, unlike
    ``torch.multinomial``'s 2^24 limit)."""
    cdf = weights.double().cumsum(0)
    u = torch.rand(count, generator=generator, device=weights.device, dtype=torch.double) * cdf[-1]
    return torch.searchsorted(cdf, u).clamp(max=weights.shape[0] - 1)


def kmeans_plus_plus(
    x: Tensor, k: int, generator: torch.Generator | None = None, chunk: int = 65536
) -> Tensor:
    """Greedy k-means++ seeding: ``x (N, D)`` -> ``centroids (K, D)``. Each step is one pass over
    ``x``: a ``(N, trials)`` GEMM against the candidates, the rows' norms computed once."""
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    x_sq = x.pow(2).sum(1)  # (N,)
    first = int(torch.randint(n, (1,), generator=generator, device=x.device))
    picked = [first]
    closest = _sq_dist_to(x, x_sq, x[first : first + 1], chunk)[:, 0]  # (N,)
    for _ in range(1, k):
        if closest.sum() <= 0:  # fewer distinct points than clusters: duplicate any point
            picked.append(int(torch.randint(n, (1,), generator=generator, device=x.device)))
            continue
        cand = _sample_weighted(closest, trials, generator)
        d = torch.minimum(_sq_dist_to(x, x_sq, x[cand], chunk), closest.unsqueeze(1))  # (N, trials)
        best = int(d.sum(0).argmin())
        closest = d[:, best].contiguous()
        picked.append(int(cand[best]))
    return x[picked].clone()


ENGINES = ("auto", "torch", "faiss", "sklearn")
# a torch Lloyd pass on a CPU splits its rows between threads from this many rows on
SPLIT_ROWS = 1 << 16
# Lloyd iterations per faiss ``Clustering.train`` call: one call per iteration cost about 10 %
# more per iteration than faiss's own loop (10^6 x 39, k=100, 2 cores), five cost 2 %
FAISS_ROUND = 5
# rows per float32 inertia sum of the sklearn engine, the sums added in float64
INERTIA_BLOCK = 1 << 16
# data whose mean lies further from the origin than this many times its spread (squared, per
# dimension) are centred before the fit: float32 distance rounding, about 6e-8 x ||mean||^2,
# then stays below about 1e-5 of the within-cluster distances (about D x variance)
CENTRE_RATIO = 100.0


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401  # lazy: optional CPU engine, imported only to check it is there
    except ImportError:
        return False
    return True


@functools.cache
def _sklearn_lloyd_step() -> Callable | None:
    """scikit-learn's compiled Lloyd step (``lloyd_iter_chunked_dense``: assign every row and
    sum each cluster's rows, in OpenMP threads over blocks of rows), or None when this
    scikit-learn has no such step with the arguments this module passes. It is a private
    function (older releases took the rows' norms as well), so it is tried once on four points
    before it is trusted; without it ``auto`` falls back to faiss."""
    try:
        # lazy: optional CPU engine, and a private module whose import may fail in other versions
        from sklearn.cluster._k_means_lloyd import lloyd_iter_chunked_dense
    except ImportError:
        return None
    points = np.array([[0, 0], [0, 1], [4, 0], [4, 1]], dtype=np.float32)
    old, new = np.array([[0, 0], [4, 0]], dtype=np.float32), np.empty((2, 2), dtype=np.float32)
    labels = np.zeros(4, dtype=np.int32)
    try:
        lloyd_iter_chunked_dense(
            points,
            np.ones(4, np.float32),
            old,
            new,
            np.zeros(2, np.float32),
            labels,
            np.zeros(2, np.float32),
            1,
            True,
        )
    except (TypeError, ValueError):
        return None
    if labels.tolist() != [0, 0, 1, 1] or not np.allclose(new, [[0, 0.5], [4, 0.5]]):
        return None
    return lloyd_iter_chunked_dense


def sklearn_available() -> bool:
    return _sklearn_lloyd_step() is not None


def mean_and_variance(x: Tensor, block: int = 1 << 16) -> tuple[Tensor, float]:
    """``x (N, D)`` -> its column means ``(D,)`` and the per-dimension variance averaged over
    dimensions (ddof 0, as scikit-learn's tolerance): the rows' squared distances to the mean,
    block by block (float32 norms of centred rows, summed in float64), so data far from the
    origin lose no precision and nothing the size of ``x`` is allocated. Two passes; ``x.var(0)``
    took 0.4 s at 10^5 x 768 on 2 cores, three Lloyd iterations' worth."""
    n, dim = x.shape
    mean = x.sum(0) / n
    total = 0.0
    for start in range(0, n, block):
        part = x[start : start + block] - mean
        total += float(torch.linalg.vector_norm(part, dim=1).pow_(2).sum(dtype=torch.float64))
    return mean, total / (n * dim)


class KMeans:
    """``KMeans(k).fit(x)`` then ``predict(x)``; ``centroids (K, D)`` and ``inertia`` (sum of
    squared distances of the fitted points to their centroid) after ``fit``.

    ``tol`` stops Lloyd when the centroids move less than ``tol`` times the mean per-dimension
    variance of the data (scikit-learn's criterion); ``n_init`` restarts keep the lowest inertia.
    ``batch_size`` (None: full Lloyd) runs mini-batch k-means; ``max_iter`` then counts passes
    over the data (``ceil(N / batch_size)`` steps each) and ``tol`` applies to a pass's shift.

    ``engine`` runs the Lloyd iterations: ``torch`` (any device), ``sklearn`` (scikit-learn's
    compiled Lloyd step, one call per iteration, from our k-means++ seeds: on a CPU the fastest,
    BENCHMARKS.md "k-means"), ``faiss`` (faiss-cpu's ``Clustering`` on all the points) or
    ``auto`` (on a CPU sklearn, else faiss, whichever is installed first; torch otherwise).
    Mini-batch k-means always runs in torch.
    """

    def __init__(
        self,
        k: int,
        max_iter: int = 100,
        tol: float = 1e-4,
        n_init: int = 1,
        seed: int = 0,
        chunk: int | None = None,
        batch_size: int | None = None,
        engine: str = "auto",
    ) -> None:
        if k < 1 or max_iter < 1 or n_init < 1:
            raise ConfigError(f"k-means needs k, max_iter and n_init >= 1; got {k}, {max_iter}, {n_init}")
        if batch_size is not None and batch_size < 1:
            raise ConfigError(f"k-means batch_size must be >= 1 (or None for full Lloyd); got {batch_size}")
        if engine not in ENGINES:
            raise ConfigError(f"k-means engine must be one of {', '.join(ENGINES)}; got {engine!r}")
        self.k, self.max_iter, self.tol, self.n_init = k, max_iter, tol, n_init
        self.seed, self.chunk, self.batch_size, self.engine = seed, chunk, batch_size, engine
        self.centroids: Tensor | None = None
        self.inertia: float = math.inf
        self.n_iter: int = 0

    def lloyd_engine(self, device: torch.device) -> str:
        """The engine that runs the Lloyd iterations on ``device``."""
        if self.engine in ("faiss", "sklearn") and device.type != "cpu":
            raise ConfigError(f"the {self.engine} k-means engine runs on a CPU; use engine='torch' on a GPU")
        if self.engine == "faiss" and not faiss_available():
            raise ConfigError("the faiss k-means engine needs faiss-cpu: pip install faiss-cpu")
        if self.engine == "sklearn" and not sklearn_available():
            raise ConfigError(
                "the sklearn k-means engine needs scikit-learn >= 1.2 with its compiled Lloyd step "
                "(sklearn.cluster._k_means_lloyd.lloyd_iter_chunked_dense): pip install 'scikit-learn>=1.4'"
            )
        if self.engine == "auto":
            if device.type != "cpu":
                return "torch"
            return "sklearn" if sklearn_available() else "faiss" if faiss_available() else "torch"
        return self.engine

    def fit(
        self, x: Tensor, progress: Callable[[int, float], None] | None = None, init: Tensor | None = None
    ) -> KMeans:
        """``x (N, D)`` float; ``progress(iteration, inertia)`` is called after each Lloyd step;
        ``init (K, D)``: start Lloyd there instead of from k-means++ seeds (once, no restarts)."""
        if x.ndim != 2 or x.shape[0] < self.k:
            raise ConfigError(f"k-means with k={self.k} needs a (N >= k, D) matrix; got {tuple(x.shape)}")
        x = x.float().contiguous()
        generator = torch.Generator(device=x.device).manual_seed(self.seed)
        mean, variance = mean_and_variance(x)
        threshold = self.tol * variance
        lloyd = {"faiss": self._lloyd_faiss, "sklearn": self._lloyd_sklearn, "torch": self._lloyd}[
            self.lloyd_engine(x.device)
        ]
        # every engine finds the nearest centroid as ||c||^2 - 2 x.c (+ ||x||^2) in float32, whose
        # rounding grows with the squared distance from the origin: data far from it relative to
        # its spread are centred first, on a copy (as scikit-learn centres before its Lloyd)
        shift = mean if float(mean.pow(2).sum()) > CENTRE_RATIO * variance * x.shape[1] else None
        if shift is not None:
            x = x - shift
        if init is not None:
            if init.shape != (self.k, x.shape[1]) or self.batch_size is not None:
                raise ConfigError(f"k-means init must be ({self.k}, {x.shape[1]}) centroids for full Lloyd")
            start = init.to(x).clone()  # (the sklearn engine makes its own C-ordered copy)
            self.centroids, self.inertia, self.n_iter = lloyd(
                x, start if shift is None else start - shift, threshold, progress
            )
        else:
            self._restarts(x, generator, threshold, progress, lloyd)
        if shift is not None:
            self.centroids = self.centroids + shift
        return self

    def _restarts(self, x: Tensor, generator: torch.Generator, threshold: float, progress, lloyd) -> None:
        """``n_init`` seedings and fits, the lowest inertia kept (a second ``fit`` starts afresh)."""
        self.centroids, self.inertia = None, math.inf
        for _ in range(self.n_init):
            if self.batch_size is None:
                seeds = kmeans_plus_plus(x, self.k, generator)
                centroids, inertia, n_iter = lloyd(x, seeds, threshold, progress)
            else:
                centroids, inertia, n_iter = self._minibatch(x, generator, threshold, progress)
            if inertia < self.inertia:
                self.centroids, self.inertia, self.n_iter = centroids, inertia, n_iter

    def _lloyd(self, x: Tensor, centroids: Tensor, threshold: float, progress) -> tuple[Tensor, float, int]:
        """Lloyd iterations in torch: one pass over ``x`` each (``nearest`` with ``sums``; on a
        CPU with several threads and ``SPLIT_ROWS`` rows or more, one part of the rows per
        thread), the inertia summed in float64."""
        inertia, it = math.inf, 0
        x_sq = torch.linalg.vector_norm(x, dim=1).pow_(2)  # (N,), the same every iteration
        threads = torch.get_num_threads() if x.device.type == "cpu" else 1
        pool = ThreadPoolExecutor(threads) if threads > 1 and x.shape[0] >= SPLIT_ROWS else None

        def assign(centroids: Tensor, sums: Tensor | None) -> tuple[Tensor, Tensor]:
            if pool is None:
                return nearest(x, centroids, self.chunk, x_sq, sums=sums)
            return _nearest_split(x, centroids, self.chunk, x_sq, sums, pool, threads)

        previous = None
        try:
            for it in range(1, self.max_iter + 1):
                sums = torch.zeros_like(centroids)
                labels, dists = assign(centroids, sums)
                inertia = dists.sum(dtype=torch.float64).item()
                counts = torch.bincount(labels, minlength=self.k).to(x.dtype)
                updated = sums / counts.clamp(min=1).unsqueeze(1)
                empty = counts == 0
                if empty.any():  # reseed empty clusters on the points farthest from their centroid
                    far = dists.topk(int(empty.sum())).indices
                    updated[empty] = x[far]
                shift = (updated - centroids).pow(2).sum().item()
                centroids = updated
                if progress is not None:
                    progress(it, inertia)
                if shift <= threshold or (previous is not None and torch.equal(labels, previous)):
                    break  # (no label changed: these centroids are their clusters' means already)
                previous = labels
            _, dists = assign(centroids, None)
        finally:
            if pool is not None:
                pool.shutdown()
        return centroids, dists.sum(dtype=torch.float64).item(), it

    def _lloyd_faiss(
        self, x: Tensor, centroids: Tensor, threshold: float, progress
    ) -> tuple[Tensor, float, int]:
        """Lloyd iterations by faiss-cpu's ``Clustering``, ``FAISS_ROUND`` iterations per call
        from the centroids the last call left, on every point (``max_points_per_centroid``
        lifted: faiss would otherwise subsample 256 per centroid), reading ``x`` in place; the
        final inertia from one faiss search. ``progress`` hears every iteration after its
        round, and the stopping rule reads a whole round's shift: a run stops at the end of the
        first round in which the centroids moved less than the threshold, up to
        ``2 * FAISS_ROUND - 1`` iterations after the torch engine would (at the same centroids
        when Lloyd has converged). An empty cluster takes half of a large one (faiss's split)
        instead of a far point."""
        import faiss  # lazy: optional CPU engine (faiss-cpu), not needed on a GPU

        data = x.numpy()  # shares memory with x (float32, contiguous)
        index = faiss.IndexFlatL2(x.shape[1])
        current = centroids.numpy().astype("float32", copy=True)
        params = faiss.ClusteringParameters()
        params.max_points_per_centroid = x.shape[0] + 1  # never subsample
        params.min_points_per_centroid = 1  # no warning for few points per centroid
        it = 0
        while it < self.max_iter:
            params.niter = min(FAISS_ROUND, self.max_iter - it)
            params.seed = self.seed + it
            clus = faiss.Clustering(x.shape[1], self.k, params)
            faiss.copy_array_to_vector(current.ravel(), clus.centroids)
            index.reset()
            clus.train(data, index)
            updated = faiss.vector_float_to_array(clus.centroids).reshape(self.k, -1)
            stats = clus.iteration_stats  # one per iteration run: faiss stops early once converged
            for i in range(stats.size()):
                if progress is not None:  # the inertia of iteration i's assignment
                    progress(it + i + 1, float(stats.at(i).obj))
            it += stats.size()
            shift = float(((updated - current) ** 2).sum())
            current = updated
            if shift <= threshold or stats.size() < params.niter:
                break
        index.reset()
        index.add(current)
        dists, _ = index.search(data, 1)  # (N, 1): every point to its final centroid
        return torch.from_numpy(current.copy()), float(dists.sum(dtype="float64")), it

    def _lloyd_sklearn(
        self, x: Tensor, centroids: Tensor, threshold: float, progress
    ) -> tuple[Tensor, float, int]:
        """Lloyd iterations by scikit-learn's compiled step, one call per iteration on every
        point (``torch.get_num_threads()`` OpenMP threads; BLAS kept to one thread inside, as
        scikit-learn's own ``KMeans`` does), reading ``x`` in place. The step empties no
        cluster: an empty one moves to the points farthest from their centroids, as in the torch
        engine. The inertia of each assignment (for ``progress``) and the final one are a cheap
        pass over the points and their labels (no distances to every centroid)."""
        # lazy: scikit-learn's private helpers and its BLAS control, only for this engine
        from sklearn.cluster._k_means_common import _inertia_dense
        from threadpoolctl import threadpool_limits

        step = _sklearn_lloyd_step()
        data = x.numpy()  # shares memory with x (float32, contiguous)
        threads = max(torch.get_num_threads(), 1)
        weights = np.ones(x.shape[0], dtype=np.float32)
        old = np.array(centroids.numpy(), dtype=np.float32, order="C")  # a C-ordered copy
        new = np.empty_like(old)
        previous = np.full(x.shape[0], -1, dtype=np.int32)
        in_cluster = np.zeros(self.k, dtype=np.float32)
        labels = np.zeros(x.shape[0], dtype=np.int32)
        shift = np.zeros(self.k, dtype=np.float32)

        def inertia(centres: np.ndarray) -> float:
            """Summed over blocks of rows in float64 (the step sums a thread's rows in float32)."""
            total = 0.0
            for start in range(0, x.shape[0], INERTIA_BLOCK):
                end = start + INERTIA_BLOCK
                total += _inertia_dense(
                    data[start:end], weights[start:end], centres, labels[start:end], threads
                )
            return total

        it, settled = 0, False
        with threadpool_limits(limits=1, user_api="blas"):
            for it in range(1, self.max_iter + 1):
                step(data, weights, old, new, in_cluster, labels, shift, threads, True)
                if progress is not None:  # the inertia of this iteration's assignment
                    progress(it, inertia(old))
                old, new = new, old
                settled = np.array_equal(labels, previous)  # no label changed: the centroids are final
                if settled or float((shift.astype(np.float64) ** 2).sum()) <= threshold:
                    break
                previous[:] = labels
            if not settled:  # the labels of the last centroids
                step(data, weights, old, None, None, labels, shift, threads, False)
            final = inertia(old)
        return torch.from_numpy(old.copy()), final, it

    def _minibatch(
        self, x: Tensor, generator: torch.Generator, threshold: float, progress
    ) -> tuple[Tensor, float, int]:
        """Mini-batch k-means (Sculley, 2010): batches drawn with replacement, per-centroid
        step ``1 / count``; no reassignment of empty clusters (HuBERT's ``reassignment_ratio=0``)."""
        n, batch = x.shape[0], min(self.batch_size, x.shape[0])
        init_size = min(n, max(3 * batch, 3 * self.k))  # scikit-learn ``init_size``
        subset = torch.randperm(n, generator=generator, device=x.device)[:init_size]
        centroids = kmeans_plus_plus(x[subset], self.k, generator)
        counts = torch.zeros(self.k, dtype=x.dtype, device=x.device)
        steps = math.ceil(n / batch)
        it = 0
        for it in range(1, self.max_iter + 1):
            start, seen = centroids.clone(), 0.0
            for _ in range(steps):
                part = x[torch.randint(n, (batch,), generator=generator, device=x.device)]  # (batch, D)
                labels, dists = nearest(part, centroids, self.chunk)
                sums = torch.zeros_like(centroids).index_add_(0, labels, part)
                got = torch.bincount(labels, minlength=self.k).to(x.dtype)
                counts += got
                # c <- c + (sum_b - n_b c) / count: the running mean of every point it has seen
                centroids = centroids + (sums - got.unsqueeze(1) * centroids) / counts.clamp(min=1).unsqueeze(
                    1
                )
                seen += dists.sum().item()
            if progress is not None:
                progress(it, seen * n / (steps * batch))  # the pass's batch inertia, scaled to N
            if (centroids - start).pow(2).sum().item() <= threshold:
                break
        _, dists = nearest(x, centroids, self.chunk)
        return centroids, dists.sum(dtype=torch.float64).item(), it

    def predict(self, x: Tensor) -> Tensor:
        """``x (N, D)`` -> ``labels (N,)``."""
        if self.centroids is None:
            raise ConfigError("k-means is not fitted: call fit() or load centroids first")
        return nearest(x.to(self.centroids.device), self.centroids, self.chunk)[0]

    def state_dict(self) -> dict:
        return {"centroids": self.centroids, "inertia": self.inertia, "k": self.k}

    @classmethod
    def from_centroids(cls, centroids: Tensor) -> KMeans:
        km = cls(centroids.shape[0])
        km.centroids = centroids.float()
        return km
