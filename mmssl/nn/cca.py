"""Canonical correlation analysis: the closed form, the deep CCA correlation, soft decorrelation.

* :func:`linear_cca`: regularised linear CCA in float64 (Hotelling, 1936): whiten each view,
  take the SVD of the whitened cross-covariance ``T = Sxx^-1/2 Sxy Syy^-1/2``.
* :func:`cca_correlation`: the deep CCA objective (Andrew et al., 2013, eq. 10): the sum of
  the top-``k`` singular values of ``T`` with ridge ``r`` on both covariances (``r1``, ``r2``),
  differentiable. The views are whitened with Cholesky factors rather than with ``S^-1/2``
  from ``eigh``: the singular values are the same, and the gradient has no eigenvector term,
  which divides by eigenvalue gaps and is infinite when a view has equal eigenvalues (a
  constant unit, or fewer valid frames than dimensions: the ridge makes the rest equal).
* :class:`SoftDecorrelation`: soft CCA (Chang et al., 2018, "Scalable and effective deep CCA via
  soft decorrelation"): instead of whitening, an L1 penalty on the off-diagonal entries of a
  running covariance estimate, which scales to wide embeddings (no ``D x D`` inverse).

Used by the CCA objectives (``mmssl.objectives.cca``) and by the layer-wise CCA similarity
(``mmssl.eval.probes``). Every statistic counts only valid frames: inputs come as
``(B, T, D)`` with ``lengths (B,)`` (or ``(N, D)`` with no lengths) and padded frames get zero
weight, with no boolean indexing.

Shape legend: B batch, T frames, N samples (valid frames), D feature dims, k components.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmssl.errors import ConfigError
from mmssl.nn.padding import lengths_to_padding_mask


# --- closed form ---------------------------------------------------------------------------------
def _inv_sqrt(s: Tensor, eps: float) -> Tensor:
    """``S^-1/2`` of a symmetric positive (semi)definite ``(D, D)`` matrix, eigenvalues >= eps."""
    evals, evecs = torch.linalg.eigh(s)
    return (evecs * evals.clamp(min=eps).rsqrt().unsqueeze(0)) @ evecs.transpose(0, 1)


def flatten_frames(x: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(B, T, D)`` + lengths, or ``(N, D)`` -> ``(N', D)`` and per-row weights 1 / 0."""
    if x.dim() == 2:
        if lengths is not None:
            raise ValueError("lengths go with (B, T, D) inputs, not (N, D)")
        return x, x.new_ones(x.shape[0])
    if x.dim() != 3 or lengths is None:
        raise ValueError(f"expected (N, D), or (B, T, D) with lengths; got {tuple(x.shape)}")
    keep = ~lengths_to_padding_mask(lengths, x.shape[1])
    return x.reshape(-1, x.shape[-1]), keep.reshape(-1).to(x.dtype)


def covariances(
    x: Tensor, y: Tensor, weights: Tensor, reg_x: float, reg_y: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Weighted (0/1) sample covariances of ``x (N, Dx)``, ``y (N, Dy)`` with ridges.

    Returns ``(Sxx + reg_x I, Syy + reg_y I, Sxy, n)`` with the unbiased ``1 / (n - 1)``
    normalisation, ``n`` the number of rows with weight 1.
    """
    w = weights.unsqueeze(1)
    n = weights.sum()
    denom = (n - 1).clamp(min=1)
    xc = (x - (x * w).sum(0) / n.clamp(min=1)) * w  # (N, Dx), padded rows are 0
    yc = (y - (y * w).sum(0) / n.clamp(min=1)) * w
    sxx = xc.T @ xc / denom + reg_x * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    syy = yc.T @ yc / denom + reg_y * torch.eye(y.shape[1], dtype=y.dtype, device=y.device)
    return sxx, syy, xc.T @ yc / denom, n


def linear_cca(
    x: Tensor, y: Tensor, k: int, reg: float = 1e-4, eps: float = 1e-12
) -> tuple[Tensor, Tensor, Tensor]:
    """Regularised linear CCA in float64.

    ``x (N, Dx)``, ``y (N, Dy)`` -> ``(corrs (k,), proj_x (Dx, k), proj_y (Dy, k))``: the top
    ``k`` canonical correlations and the directions such that ``(x - mean) @ proj_x`` and
    ``(y - mean) @ proj_y`` have (ridge-regularised) identity covariance and correlations
    ``corrs``. ``reg`` is added to both covariance diagonals.
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"linear_cca needs x (N, Dx) and y (N, Dy); got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if not 1 <= k <= min(x.shape[1], y.shape[1]):
        raise ValueError(f"k must be in [1, min(Dx, Dy)] = [1, {min(x.shape[1], y.shape[1])}], got {k}")
    if x.shape[0] < 2:
        raise ValueError(f"linear_cca needs at least 2 samples, got {x.shape[0]}")
    x64, y64 = x.detach().double(), y.detach().double()
    sxx, syy, sxy, _ = covariances(x64, y64, x64.new_ones(x64.shape[0]), reg, reg)
    wx, wy = _inv_sqrt(sxx, eps), _inv_sqrt(syy, eps)
    u, s, vh = torch.linalg.svd(wx @ sxy @ wy)
    return s[:k], wx @ u[:, :k], wy @ vh.T[:, :k]


# --- deep CCA ------------------------------------------------------------------------------------
def _whitened_cross_covariance(sxx: Tensor, syy: Tensor, sxy: Tensor) -> Tensor:
    """``Lx^-1 Sxy Ly^-T`` for ``Sxx = Lx Lx^T``, ``Syy = Ly Ly^T`` (Cholesky), ``(Dx, Dy)``.

    ``Sxx^-1/2 = Qx Lx^-1`` with ``Qx`` orthogonal, so this has the singular values of
    ``T = Sxx^-1/2 Sxy Syy^-1/2``. ``cholesky_ex`` does not check for failure (no host sync);
    a covariance that is not positive definite (NaN in a view) gives NaN, as a loss should."""
    lx, _ = torch.linalg.cholesky_ex(sxx)
    ly, _ = torch.linalg.cholesky_ex(syy)
    left = torch.linalg.solve_triangular(lx, sxy, upper=False)  # Lx^-1 Sxy
    return torch.linalg.solve_triangular(ly, left.T, upper=False).T  # (Lx^-1 Sxy) Ly^-T


def cca_correlation(
    x: Tensor,
    y: Tensor,
    lengths: Tensor | None = None,
    k: int | None = None,
    reg: float = 1e-3,
    eps: float = 1e-9,
) -> Tensor:
    """Deep CCA: the sum of the top ``k`` (default all) canonical correlations of ``x`` and
    ``y``, differentiable. ``x (B, T, Dx)`` / ``y (B, T, Dy)`` with ``lengths (B,)``, or
    ``(N, D)`` without. Computed in float32 at least, outside autocast.

    ``reg > 0`` is the ridge ``r1 = r2`` of Andrew et al. (2013); it keeps both covariances
    positive definite. Singular values of ``T`` are the square roots of the eigenvalues of
    ``T^T T``, clamped at ``eps``; only eigenvalues are differentiated (no eigenvector term).
    """
    if reg <= 0:
        raise ConfigError(f"cca: reg must be > 0 (the ridge on both covariances), got {reg}")
    dtype = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(device_type=x.device.type, enabled=False):
        xf, w = flatten_frames(x.to(dtype), lengths)
        yf, _ = flatten_frames(y.to(dtype), lengths)
        sxx, syy, sxy, _ = covariances(xf, yf, w, reg, reg)
        t = _whitened_cross_covariance(sxx, syy, sxy)  # (Dx, Dy)
        small = t.T @ t if t.shape[0] >= t.shape[1] else t @ t.T
        evals = torch.linalg.eigvalsh(small).clamp(min=eps)  # ascending
        k = k or evals.shape[0]
        if k > evals.shape[0]:
            raise ConfigError(f"cca: k={k} but the views have only {evals.shape[0]} components")
        return evals[-k:].sqrt().sum()


class SoftDecorrelation(nn.Module):
    """Soft decorrelation loss (Chang et al., 2018): the L1 norm of the off-diagonal entries of
    a running covariance ``Phi_t = alpha * Phi_{t-1} + C_t`` normalised by
    ``c_t = alpha * c_{t-1} + 1``; the gradient flows through the current batch's ``C_t`` only.
    ``x (N, D)`` (standardised), ``weights (N,)`` 0/1 -> scalar, averaged over the D(D-1)
    off-diagonal entries."""

    def __init__(self, dim: int, alpha: float = 0.9) -> None:
        super().__init__()
        if not 0.0 <= alpha < 1.0:
            raise ConfigError(f"soft decorrelation: alpha must be in [0, 1), got {alpha}")
        self.alpha = alpha
        self.register_buffer("running", torch.zeros(dim, dim))
        self.register_buffer("norm", torch.zeros(()))

    def forward(self, x: Tensor, weights: Tensor) -> Tensor:
        n = weights.sum().clamp(min=2)
        w = weights.unsqueeze(1)
        xc = (x - (x * w).sum(0) / n) * w
        cov = xc.T @ xc / (n - 1)  # (D, D)
        if self.training:
            phi = self.alpha * self.running + cov
            c = self.alpha * self.norm + 1.0
            with torch.no_grad():
                self.running.copy_(phi.detach())
                self.norm.copy_(c)
        else:
            phi, c = self.running + cov, self.norm + 1.0
        off = (phi / c) * (1 - torch.eye(x.shape[1], device=x.device, dtype=x.dtype))
        return off.abs().sum() / max(x.shape[1] * (x.shape[1] - 1), 1)


def standardise(x: Tensor, weights: Tensor, eps: float = 1e-5) -> Tensor:
    """Zero mean, unit variance per dim over rows with weight 1 (batch norm without affine)."""
    w = weights.unsqueeze(1)
    n = weights.sum().clamp(min=1)
    mean = (x * w).sum(0) / n
    var = ((x - mean).square() * w).sum(0) / n
    return (x - mean) * torch.rsqrt(var + eps)
