"""Deep CCA objectives, audio tower vs video tower at 25 Hz, frame by frame (``OBJECTIVES``):
``dcca`` (deep CCA, Andrew et al., 2013), ``soft_cca`` (distance + soft decorrelation, Chang
et al., 2018) and ``dccae`` (deep canonically correlated autoencoders, Wang et al., 2015: deep
CCA plus each view reconstructed from its own code). The CCA itself (closed form, the
differentiable deep CCA correlation, soft decorrelation) is ``mmssl.nn.cca``, which the
layer-wise CCA similarity of ``mmssl.eval.probes`` uses too.

Every statistic counts only valid frames, with no boolean indexing.

Shape legend: B batch, T frames, N samples (valid frames), D feature dims, k components.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmssl.encoders.av import TwoTowerViews, require_paired, two_views
from mmssl.nn.cca import SoftDecorrelation, cca_correlation, flatten_frames, standardise
from mmssl.nn.padding import lengths_to_padding_mask
from mmssl.objectives.base import Objective
from mmssl.registry import OBJECTIVES


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

    def __init__(
        self, views: TwoTowerViews, out_dim: int, decorrelation: float = 1.0, alpha: float = 0.9
    ) -> None:
        super().__init__()
        self.views, self.decorrelation = views, decorrelation
        self.sdl_audio = SoftDecorrelation(out_dim, alpha)
        self.sdl_video = SoftDecorrelation(out_dim, alpha)

    def forward(self, batch: dict) -> dict[str, Tensor]:
        require_paired(batch, "soft_cca")
        za, zv, lengths, _ = self.views(batch)
        with torch.autocast(device_type=za.device.type, enabled=False):
            xa, w = flatten_frames(za.float(), lengths)
            xv, _ = flatten_frames(zv.float(), lengths)
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
        audio_err = (
            (self.audio_decoder(za) - self._audio_target(raw, lengths)).square().mean(-1, keepdim=True)
        )
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


# ``shared_encoder`` (every builder here): one audio-visual encoder to read as both towers, which
# other objectives train too (objective ``multi``); None builds an audio and a video tower


@OBJECTIVES.register(shares_encoder=True)
def dcca(
    size: str = "base",
    out_dim: int = 64,
    k: int | None = None,
    reg: float = 1e-3,
    shared_encoder: nn.Module | None = None,
) -> DeepCCA:
    """Deep CCA on ``out_dim``-d frame codes of an audio and a video tower of ``size``."""
    return DeepCCA(two_views(size, out_dim, shared_encoder), k, reg)


@OBJECTIVES.register(shares_encoder=True)
def soft_cca(
    size: str = "base",
    out_dim: int = 256,
    decorrelation: float = 1.0,
    alpha: float = 0.9,
    shared_encoder: nn.Module | None = None,
) -> SoftCCA:
    """Soft CCA; suited to wide codes (no inverse of a ``out_dim x out_dim`` matrix)."""
    return SoftCCA(two_views(size, out_dim, shared_encoder), out_dim, decorrelation, alpha)


@OBJECTIVES.register(shares_encoder=True)
def dccae(
    size: str = "base",
    out_dim: int = 64,
    k: int | None = None,
    reg: float = 1e-3,
    recon: float = 1.0,
    video_grid: int = 8,
    decoder_dim: int = 256,
    shared_encoder: nn.Module | None = None,
) -> DCCAE:
    """DCCAE: deep CCA plus reconstruction of each view's input from its own code."""
    views = two_views(size, out_dim, shared_encoder)
    audio = views.audio_tower
    assert audio.audio_frontend is not None
    audio_decoder = _mlp(out_dim, decoder_dim, audio.audio_frontend.out_dim)
    video_decoder = _mlp(out_dim, decoder_dim, video_grid * video_grid)
    return DCCAE(views, audio_decoder, video_decoder, video_grid, k, reg, recon)
