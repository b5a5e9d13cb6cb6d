"""Canonical correlation analysis: the closed form, deep CCA, soft CCA and DCCAE.

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
* Objectives (``OBJECTIVES``), audio tower vs video tower at 25 Hz, frame by frame:
  ``dcca`` (deep CCA), ``soft_cca`` (distance + soft decorrelation) and ``dccae``
  (deep canonically correlated autoencoders, Wang et al., 2015: deep CCA plus each view
  reconstructed from its own code).

Every statistic counts only valid frames: inputs come as ``(B, T, D)`` with ``lengths (B,)``
(or ``(N, D)`` with no lengths) and padded frames get zero weight, with no boolean indexing.

Shape legend: B batch, T frames, N samples (valid frames), D feature dims, k components.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmssl.encoders.av import TwoTowerViews, paired_towers, require_paired
from mmssl.errors import ConfigError
from mmssl.nn.padding import lengths_to_padding_mask
from mmssl.objectives.base import Objective
from mmssl.registry import OBJECTIVES


# --- closed form ---------------------------------------------------------------------------------
def _inv_sqrt(s: Tensor, eps: float) -> Tensor:
    """``S^-1/2`` of a symmetric positive (semi)definite ``(D, D)`` matrix, eigenvalues >= eps."""
    evals, evecs = torch.linalg.eigh(s)
    return (evecs * evals.clamp(min=eps).rsqrt().unsqueeze(0)) @ evecs.transpose(0, 1)


def _flatten(x: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor]:
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
        raise ValueError(f"linear_cca needs x (N, Dx) and y (N, Dy); got {tuple(x.shape)} and {tuple(y.shape)}")
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
        xf, w = _flatten(x.to(dtype), lengths)
        yf, _ = _flatten(y.to(dtype), lengths)
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


# --- objectives ----------------------------------------------------------------------------------
class DeepCCA(Objective):
    """Deep CCA between the audio and video towers, frame by frame. ``loss = -corr``."""

    modalities = ("audio", "video")

    def __init__(self, views: TwoTowerViews, k: int | None = None, reg: float = 1e-3) -> None:
        super().__init__()
        self.views, self.k, self.reg = views, k, reg

    def forward(self, batch: dict) -> dict[str, Tensor]:
        require_paired(batch, "dcca")
        za, zv, lengths, _ = self.views(batch)
        corr = cca_correlation(za, zv, lengths, self.k, self.reg)
        k = self.k or za.shape[-1]
        return {"loss": -corr, "cca_loss": -corr, "mean_corr": corr.detach() / k}


class SoftCCA(Objective):
    """Soft CCA: mean squared distance of the standardised views plus ``decorrelation`` times
    the soft decorrelation loss of each view (Chang et al., 2018, eq. 6)."""

    modalities = ("audio", "video")

    def __init__(self, views: TwoTowerViews, out_dim: int, decorrelation: float = 1.0, alpha: float = 0.9) -> None:
        super().__init__()
        self.views, self.decorrelation = views, decorrelation
        self.sdl_audio = SoftDecorrelation(out_dim, alpha)
        self.sdl_video = SoftDecorrelation(out_dim, alpha)

    def forward(self, batch: dict) -> dict[str, Tensor]:
        require_paired(batch, "soft_cca")
        za, zv, lengths, _ = self.views(batch)
        with torch.autocast(device_type=za.device.type, enabled=False):
            xa, w = _flatten(za.float(), lengths)
            xv, _ = _flatten(zv.float(), lengths)
            xa, xv = standardise(xa, w), standardise(xv, w)
            dist = ((xa - xv).square().sum(1) * w).sum() / w.sum().clamp(min=1) / xa.shape[1]
            sdl = self.sdl_audio(xa, w) + self.sdl_video(xv, w)
        loss = dist + self.decorrelation * sdl
        return {"loss": loss, "distance_loss": dist, "decorrelation_loss": sdl}


class DCCAE(Objective):
    """Deep canonically correlated autoencoders (Wang et al., 2015): ``-corr + recon * (La + Lv)``
    with ``La`` the error reconstructing the (utterance-normalised) stacked filterbanks from the
    audio code and ``Lv`` the error reconstructing the mouth crop, average-pooled to
    ``video_grid x video_grid`` pixels, from the video code (mean squared errors over valid
    frames)."""

    modalities = ("audio", "video")

    def __init__(
        self,
        views: TwoTowerViews,
        audio_decoder: nn.Module,
        video_decoder: nn.Module,
        video_grid: int = 8,
        k: int | None = None,
        reg: float = 1e-3,
        recon: float = 1.0,
    ) -> None:
        super().__init__()
        self.views, self.audio_decoder, self.video_decoder = views, audio_decoder, video_decoder
        self.video_grid, self.k, self.reg, self.recon = video_grid, k, reg, recon

    @staticmethod
    def _audio_target(raw: Tensor, lengths: Tensor, eps: float = 1e-5) -> Tensor:
        """Stacked filterbanks with per-utterance mean and variance normalisation over valid
        frames (CMVN), so both reconstruction errors are on a comparable scale."""
        keep = (~lengths_to_padding_mask(lengths, raw.shape[1])).to(raw.dtype).unsqueeze(-1)
        n = keep.sum(1, keepdim=True).clamp(min=1)
        mean = (raw * keep).sum(1, keepdim=True) / n
        var = ((raw - mean).square() * keep).sum(1, keepdim=True) / n
        return ((raw - mean) * torch.rsqrt(var + eps)).detach()

    def _video_target(self, video: Tensor, t: int) -> Tensor:
        b = video.shape[0]
        frames = video[:, :t].reshape(-1, 1, *video.shape[-2:])  # (B*T, 1, H, W)
        pooled = F.adaptive_avg_pool2d(frames, self.video_grid)  # crops come normalised
        return pooled.reshape(b, t, -1)  # (B, T, grid*grid)

    def forward(self, batch: dict) -> dict[str, Tensor]:
        require_paired(batch, "dccae")
        za, zv, lengths, raw = self.views(batch)
        corr = cca_correlation(za, zv, lengths, self.k, self.reg)
        keep = (~lengths_to_padding_mask(lengths, za.shape[1])).to(za.dtype).unsqueeze(-1)
        frames = (keep.sum() * 1.0).clamp(min=1)
        audio_err = (self.audio_decoder(za) - self._audio_target(raw, lengths)).square().mean(-1, keepdim=True)
        video_err = (self.video_decoder(zv) - self._video_target(batch["video"], za.shape[1])).square()
        audio_loss = (audio_err * keep).sum() / frames
        video_loss = (video_err.mean(-1, keepdim=True) * keep).sum() / frames
        loss = -corr + self.recon * (audio_loss + video_loss)
        k = self.k or za.shape[-1]
        return {
            "loss": loss,
            "cca_loss": -corr,
            "audio_recon_loss": audio_loss,
            "video_recon_loss": video_loss,
            "mean_corr": corr.detach() / k,
        }


def _mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Module:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))


@OBJECTIVES.register
def dcca(size: str = "base", out_dim: int = 64, k: int | None = None, reg: float = 1e-3) -> DeepCCA:
    """Deep CCA on ``out_dim``-d frame codes of an audio and a video tower of ``size``."""
    audio, video = paired_towers(size)
    return DeepCCA(TwoTowerViews(audio, video, out_dim), k, reg)


@OBJECTIVES.register
def soft_cca(size: str = "base", out_dim: int = 256, decorrelation: float = 1.0, alpha: float = 0.9) -> SoftCCA:
    """Soft CCA; suited to wide codes (no inverse of a ``out_dim x out_dim`` matrix)."""
    audio, video = paired_towers(size)
    return SoftCCA(TwoTowerViews(audio, video, out_dim), out_dim, decorrelation, alpha)


@OBJECTIVES.register
def dccae(
    size: str = "base",
    out_dim: int = 64,
    k: int | None = None,
    reg: float = 1e-3,
    recon: float = 1.0,
    video_grid: int = 8,
    decoder_dim: int = 256,
) -> DCCAE:
    """DCCAE: deep CCA plus reconstruction of each view's input from its own code."""
    audio, video = paired_towers(size)
    assert audio.audio_frontend is not None
    views = TwoTowerViews(audio, video, out_dim)
    audio_decoder = _mlp(out_dim, decoder_dim, audio.audio_frontend.out_dim)
    video_decoder = _mlp(out_dim, decoder_dim, video_grid * video_grid)
    return DCCAE(views, audio_decoder, video_decoder, video_grid, k, reg, recon)
