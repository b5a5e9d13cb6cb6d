"""The audio-visual encoder (an ``AudioVisualEncoder``): two 25 Hz streams, fusion, one
shared transformer (AV-HuBERT).

* audio: 26 Kaldi log filterbanks stacked x4 (100 Hz -> 25 Hz, 104 values per frame), each
  stacked frame layer-normed, and a linear projection (AV-HuBERT: ``logfbank``'s 26 filters,
  ``stack_order_audio: 4``, ``normalize: true``, ``audio_feat_dim: 104``; its audio
  ``SubModel`` is a Linear from the stacked features to the model dim). The normalisation
  makes the stream blind to the recording gain and puts it on the lip stream's scale at the
  fusion;
* video: the lip encoder (3D stem + ResNet-18, 512-d per frame) and a linear projection;
* fusion: concat, LayerNorm, Linear, with modality dropout (:class:`AVFusion`);
* the transformer (``mmssl.nn.transformer``), every layer returned.

The halves are exposed so objectives can act between them: ``audio_features`` /
``video_features`` (AV-HuBERT masks there), ``fuse``, ``contextualize``. ``encode(batch)`` runs
everything on whichever of ``audio`` / ``video`` the batch has; a missing modality is fed as
zeros inside the fusion. A stream can also be left out at build time (``audio=False`` or
``video=False``), which makes a single-modality tower for the multi-view objectives.

Presets (``ENCODERS``): ``av_tiny`` (tests), ``av_small`` (CPUs: 4 layers of 256 dims over a
lip encoder that reads 22x22 pixels), ``av_base`` (AV-HuBERT Base: 12 layers, 768
dims, 12 heads, FFN 3072), ``av_large`` (AV-HuBERT Large: 24 layers, 1024 dims, 16 heads, FFN 4096).

Also here: ``paired_towers`` / ``TwoTowerViews`` / ``two_views`` (an audio-only and a
video-only encoder, as the multi-view and CCA objectives use them, or one audio-visual encoder
read once per modality when they share it with other objectives), ``substitute_frames``
(AV-HuBERT's video masking) and ``av_features`` (frozen layer features, for k-means targets
of the next iteration).

Shape legend: B batch, S samples, T frames (25 Hz), C model dim, F stacked filterbanks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mmssl.constants import VIDEO_FPS
from mmssl.encoders.audio import build_preset
from mmssl.encoders.base import AudioVisualEncoder, EncoderOutput
from mmssl.encoders.fusion import AVFusion
from mmssl.encoders.video import LipEncoder, lip_resnet18, lip_small, lip_tiny
from mmssl.errors import ConfigError, DataError
from mmssl.nn.frontend import FbankFrontend
from mmssl.nn.padding import lengths_to_padding_mask
from mmssl.nn.transformer import TransformerEncoder, TransformerOptions
from mmssl.registry import ENCODERS

FRAME_RATE = VIDEO_FPS  # both streams meet at the video's frame rate


class AVEncoder(AudioVisualEncoder):
    """Injected parts: ``audio_frontend`` + ``audio_proj`` (or None), ``video_frontend`` +
    ``video_proj`` (or None), ``fusion``, ``transformer``."""

    def __init__(
        self,
        audio_frontend: FbankFrontend | None,
        audio_proj: nn.Module | None,
        video_frontend: LipEncoder | None,
        video_proj: nn.Module | None,
        fusion: AVFusion,
        transformer: TransformerEncoder,
        mask_embedding: bool = True,
    ) -> None:
        super().__init__()
        if audio_frontend is None and video_frontend is None:
            raise ConfigError("an audio-visual encoder needs at least one stream")
        self.audio_frontend, self.audio_proj = audio_frontend, audio_proj
        self.video_frontend, self.video_proj = video_frontend, video_proj
        self.fusion, self.transformer = fusion, transformer
        self.dim = transformer.dim
        self.frame_rate = FRAME_RATE
        self.frame_spec = audio_frontend.frame_spec if audio_frontend is not None else None
        # AV-HuBERT / HuBERT: a learned vector drawn uniformly in [0, 1) for masked audio frames
        # (left out when nothing masks, so every parameter takes part in a step, as DDP wants)
        use_mask = mask_embedding and audio_frontend is not None
        self.audio_mask_embedding = nn.Parameter(torch.rand(fusion.audio_dim)) if use_mask else None

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(
            m for m, f in (("audio", self.audio_frontend), ("video", self.video_frontend)) if f is not None
        )

    def audio_features(self, audio: Tensor, audio_lens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``audio (B, S)`` -> ``(x (B, T, Ca), raw (B, T, F), lengths (B,))`` at 25 Hz."""
        if self.audio_frontend is None or self.audio_proj is None:
            raise DataError("this encoder has no audio stream, but the batch has audio")
        raw, lengths = self.audio_frontend(audio, audio_lens)
        return self.audio_proj(raw), raw, lengths

    def video_features(self, video: Tensor, video_lens: Tensor) -> tuple[Tensor, Tensor]:
        """``video (B, T, 1, H, W)`` normalised crops -> ``(x (B, T, Cv), lengths (B,))``."""
        if self.video_frontend is None or self.video_proj is None:
            raise DataError("this encoder has no video stream, but the batch has video")
        out = self.video_frontend(video, video_lens)
        return self.video_proj(out.hidden), out.lengths

    def mask_audio(self, x: Tensor, mask: Tensor) -> Tensor:
        """Replace frames of ``x (B, T, Ca)`` where ``mask (B, T)`` with the learned embedding."""
        if self.audio_mask_embedding is None:
            raise ConfigError("this encoder was built without a mask embedding (mask_embedding=False)")
        return torch.where(mask.unsqueeze(-1), self.audio_mask_embedding.to(x.dtype), x)

    def fuse(
        self,
        audio: Tensor | None,
        audio_lens: Tensor | None,
        video: Tensor | None,
        video_lens: Tensor | None,
        keep: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        return self.fusion(audio, audio_lens, video, video_lens, keep)

    def contextualize(self, x: Tensor, lengths: Tensor) -> EncoderOutput:
        return self.transformer(x, lengths, frame_rate=self.frame_rate)

    def streams(self, batch: dict) -> dict[str, Tensor | None]:
        """Each stream of ``batch`` this encoder reads, before fusion: ``audio``, ``audio_raw``
        (the stacked filterbanks), ``audio_lens``, ``video``, ``video_lens``; None for a stream
        the batch or the encoder lacks."""
        out: dict[str, Tensor | None] = dict.fromkeys(
            ("audio", "audio_raw", "audio_lens", "video", "video_lens")
        )
        if "audio" in batch and self.audio_frontend is not None:
            out["audio"], out["audio_raw"], out["audio_lens"] = self.audio_features(
                batch["audio"], batch["audio_lens"]
            )
        if "video" in batch and self.video_frontend is not None:
            out["video"], out["video_lens"] = self.video_features(batch["video"], batch["video_lens"])
        if out["audio"] is None and out["video"] is None:
            raise DataError(f"the batch has none of this encoder's modalities {self.modalities}")
        return out

    def forward(
        self,
        audio: Tensor | None = None,
        audio_lens: Tensor | None = None,
        video: Tensor | None = None,
        video_lens: Tensor | None = None,
    ) -> EncoderOutput:
        batch = {}
        if audio is not None:
            batch.update(audio=audio, audio_lens=audio_lens)
        if video is not None:
            batch.update(video=video, video_lens=video_lens)
        return self.encode(batch)


def substitute_frames(video: Tensor, src_index: Tensor) -> Tensor:
    """``video (B, T, ...)`` with frame ``t`` of clip ``b`` taken from frame ``src_index[b, t]``
    of the same clip. ``src_index (B, T)`` long (identity where nothing is replaced)."""
    b, t = src_index.shape
    idx = src_index.view(b, t, *([1] * (video.dim() - 2))).expand(b, t, *video.shape[2:])
    return video.gather(1, idx)


# AV-HuBERT (Shi et al., 2022; fairseq ``layer_norm_first=True``, ``encoder_layerdrop=0.05``)
AV_HUBERT_TRANSFORMER = TransformerOptions(pre_norm=True, layer_drop=0.05)


def build_av_encoder(
    transformer: TransformerOptions = AV_HUBERT_TRANSFORMER,
    lip: str = "resnet18",
    audio: bool = True,
    video: bool = True,
    num_mel_bins: int = 26,  # AV-HuBERT: python_speech_features ``logfbank`` (nfilt=26)
    stack: int = 4,  # ``stack_order_audio``
    normalize_audio: bool = True,  # ``normalize``: layer norm over each stacked frame
    audio_features: str = "kaldi",  # "psf": python_speech_features, as converted AV-HuBERT runs
    modality_dropout: float = 0.5,
    audio_dropout: float = 0.5,
    mask_embedding: bool = True,
    **transformer_fields: Any,
) -> AVEncoder:
    """Audio-visual encoder. ``lip``: ``"resnet18"`` (AV-HuBERT), ``"small"`` (CPU) or ``"tiny"`` (tests);
    ``mask_embedding``: whether masked-prediction objectives can mask the audio stream;
    ``audio_features``: ``"kaldi"`` filterbanks (mmssl's) or ``"psf"`` (``python_speech_features``,
    what AV-HuBERT's released models were trained on; ``mmssl convert`` sets it for them);
    ``transformer_fields`` change fields of ``transformer`` (``dim=256, num_layers=4``)."""
    options = transformer.replace(**transformer_fields)
    lips = {"resnet18": lip_resnet18, "small": lip_small, "tiny": lip_tiny}
    if lip not in lips:
        raise ConfigError(f"av encoder: lip must be one of {sorted(lips)}, got {lip!r}")
    if not (audio or video):
        raise ConfigError("av encoder: audio and video cannot both be off")
    dim = options.dim
    audio_frontend = (
        FbankFrontend(num_mel_bins, stack, normalize=normalize_audio, kind=audio_features) if audio else None
    )
    audio_proj = nn.Linear(audio_frontend.out_dim, dim) if audio_frontend is not None else None
    video_frontend = lips[lip]() if video else None
    video_proj = nn.Linear(video_frontend.dim, dim) if video_frontend is not None else None
    both = audio and video
    fusion = AVFusion(dim, dim, dim, modality_dropout if both else 0.0, audio_dropout)
    return AVEncoder(
        audio_frontend, audio_proj, video_frontend, video_proj, fusion, options.build(), mask_embedding
    )


AV_TINY = dict(
    dim=64,
    num_layers=2,
    num_heads=4,
    ffn_dim=128,
    lip="tiny",
    pos_conv_kernel=16,
    pos_conv_groups=4,
    layer_drop=0.0,
)
# for CPUs (the demo): 256 x 4 pre-norm layers over the small lip encoder (22x22 pixels)
AV_SMALL = dict(
    dim=256,
    num_layers=4,
    num_heads=4,
    ffn_dim=1024,
    lip="small",
    pos_conv_kernel=32,
    pos_conv_groups=16,
    layer_drop=0.0,
)
AV_BASE = dict(dim=768, num_layers=12, num_heads=12, ffn_dim=3072)  # AV-HuBERT Base
AV_LARGE = dict(dim=1024, num_layers=24, num_heads=16, ffn_dim=4096)  # AV-HuBERT Large


@ENCODERS.register
def av_tiny(**overrides: Any) -> AVEncoder:
    return build_preset(build_av_encoder, "av_tiny", AV_TINY, overrides)


@ENCODERS.register
def av_small(**overrides: Any) -> AVEncoder:
    return build_preset(build_av_encoder, "av_small", AV_SMALL, overrides)


@ENCODERS.register
def av_base(**overrides: Any) -> AVEncoder:
    return build_preset(build_av_encoder, "av_base", AV_BASE, overrides)


@ENCODERS.register
def av_large(**overrides: Any) -> AVEncoder:
    return build_preset(build_av_encoder, "av_large", AV_LARGE, overrides)


def paired_towers(size: str, **overrides: Any) -> tuple[AVEncoder, AVEncoder]:
    """An audio-only and a video-only encoder of preset ``size`` (tiny | small | base | large)."""
    presets = {"tiny": av_tiny, "small": av_small, "base": av_base, "large": av_large}
    if size not in presets:
        raise ConfigError(f"size must be one of {sorted(presets)}, got {size!r}")
    overrides = {"mask_embedding": False, **overrides}
    return presets[size](video=False, **overrides), presets[size](audio=False, **overrides)


def require_paired(batch: dict, what: str) -> None:
    """``DataError`` naming ``what`` unless the batch has both audio and video."""
    missing = [k for k in ("audio", "audio_lens", "video", "video_lens") if k not in batch]
    if missing:
        raise DataError(f"{what} needs paired audio and video; the batch lacks {', '.join(missing)}")


class TwoTowerViews(nn.Module):
    """An audio tower and a video tower, each followed by a linear head to ``out_dim``; gives
    the frame-aligned views ``(B, T, out_dim)`` twice, their common ``lengths``, and the
    towers' inputs that DCCAE reconstructs. Both towers may be one audio-visual encoder: it then
    reads the audio alone for one view and the video alone for the other (the missing stream is
    zeros in its fusion, as AV-HuBERT runs on one modality)."""

    def __init__(self, audio_tower: AVEncoder, video_tower: AVEncoder, out_dim: int) -> None:
        super().__init__()
        self.audio_tower, self.video_tower = audio_tower, video_tower
        self.audio_head = nn.Linear(audio_tower.dim, out_dim)
        self.video_head = nn.Linear(video_tower.dim, out_dim)

    def encode_pair(self, batch: dict) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Tower outputs cut to a common length: ``(ha (B, T, Ca), hv (B, T, Cv), lengths (B,),
        audio_raw (B, T, F))`` (``audio_raw``: the stacked filterbanks the audio tower read)."""
        a, raw, a_lens = self.audio_tower.audio_features(batch["audio"], batch["audio_lens"])
        x, a_lens = self.audio_tower.fuse(a, a_lens, None, None)
        out_a = self.audio_tower.contextualize(x, a_lens)
        out_v = self.video_tower.encode({"video": batch["video"], "video_lens": batch["video_lens"]})
        t = min(out_a.hidden.shape[1], out_v.hidden.shape[1])
        lengths = torch.minimum(out_a.lengths, out_v.lengths).clamp(max=t)
        return out_a.hidden[:, :t], out_v.hidden[:, :t], lengths, raw[:, :t]

    def forward(self, batch: dict) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """-> ``(za (B, T, K), zv (B, T, K), lengths (B,), audio_raw (B, T, F))``."""
        ha, hv, lengths, raw = self.encode_pair(batch)
        return self.audio_head(ha), self.video_head(hv), lengths, raw


def two_views(size: str, out_dim: int, shared: nn.Module | None = None) -> TwoTowerViews:
    """The views of the multi-view objectives: an audio and a video tower of preset ``size``
    (``paired_towers``), or, given ``shared``, that one audio-visual encoder as both towers
    (objective ``multi``: it is trained by other objectives too). ``ConfigError`` unless
    ``shared`` is an ``AVEncoder`` with both streams."""
    if shared is None:
        audio, video = paired_towers(size)
        return TwoTowerViews(audio, video, out_dim)
    streams = shared.modalities if isinstance(shared, AVEncoder) else ()
    if streams != ("audio", "video"):
        has = f"streams {', '.join(streams)}" if streams else type(shared).__name__
        raise ConfigError(
            f"two views of one shared encoder need an audio-visual encoder with audio and video; it has {has}"
        )
    return TwoTowerViews(shared, shared, out_dim)


def av_features(encoder: AVEncoder, batch: dict, layer: int | None = None) -> tuple[Tensor, Tensor]:
    """Frozen features for k-means / probes: ``(B, T, C)`` of transformer layer ``layer``
    (1-based; 0 = the fused transformer input; None = the final output) on whatever modalities
    the batch has, and ``lengths (B,)``. Padded frames are zero. Call in eval mode."""
    with torch.no_grad():
        x, lengths = encoder.fused_input(batch)
        if layer == 0:
            feats = x
        else:
            out = encoder.contextualize(x, lengths)
            if layer is None:
                feats = out.hidden
            elif 1 <= layer <= len(out.layers):
                feats = out.layers[layer - 1]
            else:
                raise ConfigError(
                    f"layer {layer} out of range: the encoder has layers 1..{len(out.layers)} "
                    "(0: their input)"
                )
    pad = lengths_to_padding_mask(lengths, feats.shape[1])
    return feats.masked_fill(pad.unsqueeze(-1), 0.0), lengths
