"""Layer-wise CCA similarity: how much of a reference (input features, another model's layers)
each layer of an encoder keeps, as a table and a PNG plot.

Three scores of two sets of frames ``x (N, Dx)``, ``y (N, Dy)`` (rows are the same frames):

* ``"cca"``: mean of the top canonical correlations (linear CCA, ``mmssl.nn.cca``);
* ``"svcca"``: SVCCA (Raghu et al., 2017): each view is first reduced to the top singular
  directions that keep ``keep_variance`` (0.99 in the paper) of its variance, then mean CCA;
* ``"pwcca"``: projection-weighted CCA (Morcos et al., 2018, eq. 2): canonical correlations
  weighted by how much of ``x`` each canonical variate accounts for,
  ``alpha_i ~ sum_j |<h_i, x_j>|`` with ``h_i`` the i-th canonical variate and ``x_j`` the
  centred columns of ``x``.

Frames are the valid frames of each record (``mmssl.eval.layers.collect``), so padding never
enters a statistic. CCA needs many more frames than dimensions (``N >> D``); ``reg`` adds a small ridge.
Tables are made with ``mmssl.tables``, plots with ``mmssl.eval.report``.

Shape legend: B batch, T frames, C channels, N frames pooled over a data set, L layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mmssl.errors import ConfigError
from mmssl.eval.report import line_plot
from mmssl.nn.cca import linear_cca
from mmssl.tables import markdown_table

METHODS = ("cca", "svcca", "pwcca")  # the names `mmssl layers --method` takes
# float32 features keep ~1e-7 of relative noise in a direction they do not vary in
RANK_RTOL = 1e-5


def _centre(x: Tensor) -> Tensor:
    x = x.detach().double()
    return x - x.mean(0)


def svd_reduce(x: Tensor, keep_variance: float = 0.99) -> Tensor:
    """Centred ``x (N, D)`` projected on its top singular directions that keep
    ``keep_variance`` of the variance -> ``(N, D')``."""
    xc = _centre(x)
    u, s, _ = torch.linalg.svd(xc, full_matrices=False)
    energy = torch.cumsum(s**2, 0) / (s**2).sum().clamp(min=1e-300)
    dims = int(torch.searchsorted(energy, torch.tensor(keep_variance, dtype=energy.dtype)).item()) + 1
    dims = min(dims, s.shape[0])
    return u[:, :dims] * s[:dims]


def numerical_rank(x: Tensor, rtol: float = RANK_RTOL) -> int:
    """Rank of centred ``x (N, D)``: singular values above ``rtol`` times the largest (at least 1).
    Read from the eigenvalues of the ``(D, D)`` Gram matrix, which is cheaper than an SVD of
    ``x`` when ``N >> D``."""
    x = x.double()
    eig = torch.linalg.eigvalsh(x.T @ x).clamp(min=0.0)  # squared singular values
    return max(1, int((eig > rtol**2 * eig.max()).sum()))


def cca_similarity(
    x: Tensor,
    y: Tensor,
    method: str = "cca",
    k: int | None = None,
    reg: float = 1e-6,
    keep_variance: float = 0.99,
) -> float:
    """Similarity in [0, 1] of ``x (N, Dx)`` and ``y (N, Dy)`` (same frames in the same order).

    ``k``: number of canonical correlations used (default all there are: the smaller of the two
    ranks after any SVD reduction, so a direction in which a view does not vary, such as the
    channel mean after a LayerNorm, does not count as an uncorrelated pair).
    """
    if method not in METHODS:
        raise ConfigError(f"unknown CCA similarity {method!r}; one of {', '.join(METHODS)}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} frames but y has {y.shape[0]}")
    xc, yc = _centre(x), _centre(y)
    if method == "svcca":
        xc, yc = svd_reduce(xc, keep_variance), svd_reduce(yc, keep_variance)
    k = min(k or min(numerical_rank(xc), numerical_rank(yc)), xc.shape[1], yc.shape[1])
    corrs, proj_x, _ = linear_cca(xc, yc, k, reg)
    corrs = corrs.clamp(0.0, 1.0)
    if method != "pwcca":
        return float(corrs.mean())
    variates = xc @ proj_x  # (N, k) canonical variates of x
    variates = variates / variates.norm(dim=0).clamp(min=1e-300)
    alpha = (variates.T @ xc).abs().sum(1)  # (k,)
    return float((alpha / alpha.sum().clamp(min=1e-300) * corrs).sum())


def layerwise_similarity(
    layers: Sequence[Tensor], references: Sequence[Tensor], method: str = "cca", **kwargs: float
) -> np.ndarray:
    """``(L, M)`` matrix: similarity of each of ``L`` layers ``(N, C)`` with each of ``M``
    references ``(N, D)`` (input features, or another model's layers)."""
    table = np.zeros((len(layers), len(references)))
    for i, layer in enumerate(layers):
        for j, ref in enumerate(references):
            table[i, j] = cca_similarity(layer, ref, method, **kwargs)  # type: ignore[arg-type]
    return table


def format_table(values: np.ndarray, rows: Sequence[str], columns: Sequence[str], digits: int = 3) -> str:
    """A Markdown table of ``values (L, M)``: a row per layer, a column per reference."""
    values = np.atleast_2d(values)
    return markdown_table(["layer", *columns], [[r, *row] for r, row in zip(rows, values.tolist())], digits)


def plot_layers(values: np.ndarray, path: str | Path, series: Sequence[str], title: str) -> Path:
    """Line plot of ``values (L, M)`` (``mmssl.eval.report.line_plot``): similarity (0..1)
    against layer (1..L), one line per reference. Returns the path of the PNG."""
    values = np.asarray(values, dtype=np.float64).reshape(-1, len(series))  # (L, M)
    layers = [str(i) for i in range(1, values.shape[0] + 1)]
    lines = {name: values[:, j].tolist() for j, name in enumerate(series)}
    return line_plot(
        layers, lines, path, xlabel="layer", ylabel="similarity", title=title, ylim=(-0.02, 1.02)
    )
