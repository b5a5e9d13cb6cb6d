"""k-means in torch, on whatever device the data lives on (GPU when there is one).

k-means++ seeding with greedy local trials (Arthur & Vassilvitskii, 2007; the greedy variant
of scikit-learn, ``2 + ln k`` candidates per step), then Lloyd iterations. Distances and
centroid sums are computed over chunks of rows, so memory stays ``chunk x k`` whatever the
number of points. HuBERT (Hsu et al., 2021, sec. IV-B) fits on a random subset of frames and
then assigns every frame; ``fit`` and ``predict`` are split for that.

``batch_size`` switches Lloyd for mini-batch k-means (Sculley, 2010), what HuBERT's
``simple_kmeans/learn_kmeans.py`` runs (scikit-learn ``MiniBatchKMeans``, ``batch_size=10000``,
``reassignment_ratio=0``): each step assigns a random batch and moves every centroid towards
its batch mean with a per-centroid rate of one over the points it has seen so far. k-means++
seeds on a random subset of ``3 * batch_size`` points (scikit-learn's ``init_size``).

Shape legend: N points, D dimensions, K clusters.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from mmssl.errors import ConfigError


def nearest(x: Tensor, centroids: Tensor, chunk: int = 32768) -> tuple[Tensor, Tensor]:
    """``x (N, D)``, ``centroids (K, D)`` -> (``labels (N,)`` long, ``sq_dist (N,)``) of the
    nearest centroid."""
    c_sq = centroids.pow(2).sum(1)  # (K,)
    labels = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    dists = torch.empty(x.shape[0], dtype=centroids.dtype, device=x.device)
    for start in range(0, x.shape[0], chunk):
        part = x[start : start + chunk].to(centroids.dtype)
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2, clamped for rounding
        d = part.pow(2).sum(1, keepdim=True) - 2 * part @ centroids.T + c_sq  # (n, K)
        best, idx = d.min(1)
        labels[start : start + chunk] = idx
        dists[start : start + chunk] = best.clamp(min=0)
    return labels, dists


def _sq_dist_to(x: Tensor, points: Tensor, chunk: int) -> Tensor:
    """``x (N, D)``, ``points (M, D)`` -> ``(M, N)`` squared distances (M small)."""
    out = torch.empty(points.shape[0], x.shape[0], dtype=x.dtype, device=x.device)
    p_sq = points.pow(2).sum(1, keepdim=True)
    for start in range(0, x.shape[0], chunk):
        part = x[start : start + chunk]
        d = p_sq - 2 * points @ part.T + part.pow(2).sum(1)
        out[:, start : start + chunk] = d.clamp(min=0)
    return out


def _sample_weighted(weights: Tensor, count: int, generator: torch.Generator | None) -> Tensor:
    """``count`` indices drawn with probability proportional to ``weights (N,)`` (any N, unlike
    ``torch.multinomial``'s 2^24 limit)."""
    cdf = weights.double().cumsum(0)
    u = torch.rand(count, generator=generator, device=weights.device, dtype=torch.double) * cdf[-1]
    return torch.searchsorted(cdf, u).clamp(max=weights.shape[0] - 1)


def kmeans_plus_plus(
    x: Tensor, k: int, generator: torch.Generator | None = None, chunk: int = 32768
) -> Tensor:
    """Greedy k-means++ seeding: ``x (N, D)`` -> ``centroids (K, D)``."""
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    first = torch.randint(n, (1,), generator=generator, device=x.device)
    centroids = [x[first]]
    closest = _sq_dist_to(x, x[first], chunk)[0]  # (N,)
    for _ in range(1, k):
        if closest.sum() <= 0:  # fewer distinct points than clusters: duplicate any point
            pick = torch.randint(n, (1,), generator=generator, device=x.device)
            centroids.append(x[pick])
            continue
        cand = _sample_weighted(closest, trials, generator)
        d = torch.minimum(_sq_dist_to(x, x[cand], chunk), closest)  # (trials, N)
        best = d.sum(1).argmin()
        closest = d[best]
        centroids.append(x[cand[best]].unsqueeze(0))
    return torch.cat(centroids)


class KMeans:
    """``KMeans(k).fit(x)`` then ``predict(x)``; ``centroids (K, D)`` and ``inertia`` (sum of
    squared distances of the fitted points to their centroid) after ``fit``.

    ``tol`` stops Lloyd when the centroids move less than ``tol`` times the mean per-dimension
    variance of the data (scikit-learn's criterion); ``n_init`` restarts keep the lowest inertia.
    ``batch_size`` (None: full Lloyd) runs mini-batch k-means; ``max_iter`` then counts passes
    over the data (``ceil(N / batch_size)`` steps each) and ``tol`` applies to a pass's shift.
    """

    def __init__(
        self,
        k: int,
        max_iter: int = 100,
        tol: float = 1e-4,
        n_init: int = 1,
        seed: int = 0,
        chunk: int = 32768,
        batch_size: int | None = None,
    ) -> None:
        if k < 1 or max_iter < 1 or n_init < 1:
            raise ConfigError(f"k-means needs k, max_iter and n_init >= 1; got {k}, {max_iter}, {n_init}")
        if batch_size is not None and batch_size < 1:
            raise ConfigError(f"k-means batch_size must be >= 1 (or None for full Lloyd); got {batch_size}")
        self.k, self.max_iter, self.tol, self.n_init = k, max_iter, tol, n_init
        self.seed, self.chunk, self.batch_size = seed, chunk, batch_size
        self.centroids: Tensor | None = None
        self.inertia: float = math.inf
        self.n_iter: int = 0

    def fit(self, x: Tensor, progress: Callable[[int, float], None] | None = None) -> KMeans:
        """``x (N, D)`` float; ``progress(iteration, inertia)`` is called after each Lloyd step."""
        if x.ndim != 2 or x.shape[0] < self.k:
            raise ConfigError(f"k-means with k={self.k} needs a (N >= k, D) matrix; got {tuple(x.shape)}")
        x = x.float()
        generator = torch.Generator(device=x.device).manual_seed(self.seed)
        threshold = self.tol * x.var(0).mean().item()
        for _ in range(self.n_init):
            if self.batch_size is None:
                init = kmeans_plus_plus(x, self.k, generator, self.chunk)
                centroids, inertia, n_iter = self._lloyd(x, init, threshold, progress)
            else:
                centroids, inertia, n_iter = self._minibatch(x, generator, threshold, progress)
            if inertia < self.inertia:
                self.centroids, self.inertia, self.n_iter = centroids, inertia, n_iter
        return self

    def _lloyd(self, x: Tensor, centroids: Tensor, threshold: float, progress) -> tuple[Tensor, float, int]:
        inertia, it = math.inf, 0
        for it in range(1, self.max_iter + 1):
            labels, dists = nearest(x, centroids, self.chunk)
            inertia = dists.sum().item()
            sums = torch.zeros_like(centroids).index_add_(0, labels, x)
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
            if shift <= threshold:
                break
        labels, dists = nearest(x, centroids, self.chunk)
        return centroids, dists.sum().item(), it

    def _minibatch(
        self, x: Tensor, generator: torch.Generator, threshold: float, progress
    ) -> tuple[Tensor, float, int]:
        """Mini-batch k-means (Sculley, 2010): batches drawn with replacement, per-centroid
        step ``1 / count``; no reassignment of empty clusters (HuBERT's ``reassignment_ratio=0``)."""
        n, batch = x.shape[0], min(self.batch_size, x.shape[0])
        init_size = min(n, max(3 * batch, 3 * self.k))  # scikit-learn ``init_size``
        subset = torch.randperm(n, generator=generator, device=x.device)[:init_size]
        centroids = kmeans_plus_plus(x[subset], self.k, generator, self.chunk)
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
        return centroids, dists.sum().item(), it

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
