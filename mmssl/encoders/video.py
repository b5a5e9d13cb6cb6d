"""Lip-video encoder: a 3D-convolution stem and a ResNet-18 trunk applied to every frame.

The layout follows AV-HuBERT's ``ResEncoder`` (Shi et al., 2022, sec. 3; itself after
Martinez et al., 2020): ``Conv3d(1 -> 64, kernel 5x7x7, stride 1x2x2)``, BatchNorm, PReLU,
``MaxPool3d(1x3x3, stride 1x2x2)``, then the four stages of a ResNet-18 (two basic blocks
each, 64/128/256/512 channels) on each frame separately and a global average pool: one
512-d vector per frame at the video's 25 fps.

Padding. Padded frames never change a valid frame's output:

* pixels of padded frames are set to zero (the normalised mean grey), so the temporal
  convolution sees exactly the zero padding it would see on the clip alone;
* every BatchNorm is a :class:`MaskedBatchNorm`, whose training statistics count only valid
  frames (so the running statistics, and thus evaluation, do not depend on padding);
* the trunk is frame-wise, so padded frames cannot reach valid ones there; their outputs
  are zeroed.

In evaluation mode a padded batch therefore gives exactly each clip's output alone; in
training mode the batch statistics are those of the valid frames of the batch.

Input: grayscale mouth crops already normalised as AV-HuBERT (``(x / 255 - 0.421) / 0.165``,
done by the dataset, ``mmssl.data.datasets.lip_frames``).

Augmentation (AV-HuBERT): a random ``crop x crop`` window (88 from 96) per clip and a
horizontal flip with probability 0.5 per clip in training, the centre window in evaluation.

Shape legend: B batch, T frames, C channels, H/W pixels.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import conv1x1, conv3x3

from mmssl.constants import VIDEO_FPS
from mmssl.encoders.base import EncoderOutput
from mmssl.errors import ConfigError, DataError
from mmssl.nn.padding import lengths_to_padding_mask

ActLayer = Callable[[int], nn.Module]


def prelu(channels: int) -> nn.Module:
    """One slope per channel, as AV-HuBERT's ``relu_type='prelu'``."""
    return nn.PReLU(num_parameters=channels)


def relu(channels: int) -> nn.Module:
    return nn.ReLU(inplace=True)


class MaskedBatchNorm(nn.BatchNorm2d):
    """BatchNorm over channel dim 1 of a 4D or 5D tensor whose training statistics count only
    valid entries.

    ``valid`` broadcasts against ``x`` with size 1 on the channel dim: ``(N, 1, 1, 1)`` for
    frames stacked on the batch dim, ``(B, 1, T, 1, 1)`` for clips. ``None`` means all valid.
    Parameters and buffers have BatchNorm's names, so state dicts load either way. Statistics
    are accumulated in float32 under autocast.
    """

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() not in (4, 5):
            raise ValueError(f"MaskedBatchNorm expects 4D or 5D input, got {x.dim()}D")

    def forward(self, x: Tensor, valid: Tensor | None = None) -> Tensor:  # type: ignore[override]
        self._check_input_dim(x)
        if not self.training or valid is None:
            return super().forward(x)
        shape = [1, -1] + [1] * (x.dim() - 2)
        # masked sums over every dim but the channels, in two passes (mean, then the centred
        # square). Not per-frame torch.var_mean and a combination of those: on a CPU its
        # reduction over the few values of each frame of a late ResNet stage (1x1, 2x2) cost
        # 30 ms a call on 1000 frames, 40 % of the small AV model's training step
        inner = [d for d in range(2, x.dim()) if valid.shape[d] == 1]
        outer = [d for d in range(x.dim()) if d != 1]
        w = valid.to(torch.float32)
        xf = x.float()
        count = w.sum()  # valid frames
        n = count * math.prod(x.shape[d] for d in inner)  # valid entries per channel
        denom = n.clamp(min=1.0)
        mean = (xf * w).sum(outer) / denom  # (C,)
        var = ((xf - mean.view(shape)).square() * w).sum(outer) / denom
        if self.track_running_stats:
            with torch.no_grad():
                momentum = self.momentum if self.momentum is not None else 0.1
                unbiased = var * n / (n - 1.0).clamp(min=1.0)
                seen = (count > 0).to(mean.dtype)  # an all-padding batch leaves them alone
                self.running_mean.lerp_(mean.detach(), momentum * seen)
                self.running_var.lerp_(unbiased.detach(), momentum * seen)
                self.num_batches_tracked.add_(1)
        scale = torch.rsqrt(var + self.eps)
        if self.affine:
            scale = scale * self.weight
        shift = -mean * scale + (self.bias if self.affine else 0.0)
        return torch.addcmul(shift.view(shape).to(x.dtype), x, scale.view(shape).to(x.dtype))


class MaskedBasicBlock(nn.Module):
    """torchvision's ``BasicBlock`` layout (3x3 conv, BN, act, 3x3 conv, BN, shortcut, act)
    with :class:`MaskedBatchNorm`, so it takes the frame mask along. ``x (N, C, H, W)``."""

    def __init__(self, in_channels: int, channels: int, stride: int, act: ActLayer) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, channels, stride)
        self.bn1 = MaskedBatchNorm(channels)
        self.act1 = act(channels)
        self.conv2 = conv3x3(channels, channels)
        self.bn2 = MaskedBatchNorm(channels)
        self.act2 = act(channels)
        self.down_conv: nn.Module | None = None
        self.down_bn: MaskedBatchNorm | None = None
        if stride != 1 or in_channels != channels:
            self.down_conv = conv1x1(in_channels, channels, stride)
            self.down_bn = MaskedBatchNorm(channels)

    def forward(self, x: Tensor, valid: Tensor | None) -> Tensor:
        out = self.act1(self.bn1(self.conv1(x), valid))
        out = self.bn2(self.conv2(out), valid)
        shortcut = x
        if self.down_conv is not None and self.down_bn is not None:
            shortcut = self.down_bn(self.down_conv(x), valid)
        return self.act2(out + shortcut)


def random_crop_flip(
    video: Tensor, crop: int, flip: bool, generator: torch.Generator | None = None
) -> Tensor:
    """Training augmentation: one random ``crop x crop`` window and, with probability 0.5, a
    horizontal flip per clip. ``video (B, T, 1, H, W)`` -> ``(B, T, 1, crop, crop)``.

    Offsets are drawn on the host (no device sync); flips are applied with ``torch.where``.
    """
    b, _, _, h, w = video.shape
    if h > crop or w > crop:
        tops = torch.randint(0, h - crop + 1, (b,), generator=generator).tolist()
        lefts = torch.randint(0, w - crop + 1, (b,), generator=generator).tolist()
        video = torch.stack(
            [
                video[i, :, :, top : top + crop, left : left + crop]
                for i, (top, left) in enumerate(zip(tops, lefts))
            ]
        )
    if flip:
        flags = torch.rand(b, generator=generator) < 0.5
        flags = flags.to(video.device, non_blocking=True).view(b, 1, 1, 1, 1)
        video = torch.where(flags, video.flip(-1), video)
    return video


def centre_crop(video: Tensor, crop: int) -> Tensor:
    """Evaluation crop: the centre ``crop x crop`` window of ``video (B, T, 1, H, W)``."""
    h, w = video.shape[-2:]
    top, left = (h - crop) // 2, (w - crop) // 2
    return video[..., top : top + crop, left : left + crop]


class LipEncoder(nn.Module):
    """Mouth-crop frames in, one vector per frame out (25 fps).

    ``forward(video (B, T, 1, H, W) normalised, video_lens (B,))`` -> ``EncoderOutput`` with
    ``hidden (B, T, C)`` (C = ``widths[-1]``), zeros at padded frames; ``layers`` is empty
    (the trunk is not a sequence model). Inputs larger than ``crop`` are cropped (random in
    training, centre in evaluation); smaller ones are an error. ``pool > 1`` averages
    ``pool x pool`` pixels of the crop before the stem (a CPU-sized model: a sixteenth of the
    pixels at ``pool=4``; AV-HuBERT's encoder reads the full crop).
    """

    def __init__(
        self,
        stem_channels: int = 64,
        widths: tuple[int, ...] = (64, 128, 256, 512),
        blocks: tuple[int, ...] = (2, 2, 2, 2),
        act: ActLayer = prelu,
        crop: int = 88,
        flip: bool = True,
        pool: int = 1,
    ) -> None:
        super().__init__()
        if pool < 1 or crop % pool:
            raise ConfigError(f"lip encoder: pool must be >= 1 and divide crop={crop}, got {pool}")
        self.crop = crop
        self.flip = flip
        self.pool = pool
        self.dim = widths[-1]
        self.frame_rate = VIDEO_FPS
        # AV-HuBERT ResEncoder.frontend3D
        self.stem_conv = nn.Conv3d(1, stem_channels, (5, 7, 7), (1, 2, 2), (2, 3, 3), bias=False)
        self.stem_bn = MaskedBatchNorm(stem_channels)
        self.stem_act = act(stem_channels)
        self.stem_pool = nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1))
        layers: list[MaskedBasicBlock] = []
        cin = stem_channels
        for stage, (width, n) in enumerate(zip(widths, blocks)):
            for i in range(n):
                stride = 2 if (stage > 0 and i == 0) else 1
                layers.append(MaskedBasicBlock(cin, width, stride, act))
                cin = width
        self.trunk = nn.ModuleList(layers)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def prepare(self, video: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Crop (and in training flip) ``video (B, T, 1, H, W)`` to ``crop x crop``."""
        if video.dim() != 5 or video.shape[2] != 1:
            raise DataError(f"video must be (B, T, 1, H, W) grayscale, got {tuple(video.shape)}")
        h, w = video.shape[-2:]
        if h < self.crop or w < self.crop:
            raise DataError(f"video frames are {h}x{w}, smaller than the {self.crop}x{self.crop} crop")
        if self.training:
            return random_crop_flip(video, self.crop, self.flip, generator)
        return centre_crop(video, self.crop)

    def forward(self, video: Tensor, video_lens: Tensor) -> EncoderOutput:
        b, t = video.shape[:2]
        video = self.prepare(video)
        keep = ~lengths_to_padding_mask(video_lens, t)  # (B, T)
        x = video * keep.view(b, t, 1, 1, 1).to(video.dtype)  # padded frames are exact zeros
        x = x.transpose(1, 2)  # (B, 1, T, H, W)
        if self.pool > 1:
            x = F.avg_pool3d(x, (1, self.pool, self.pool))
        x = self.stem_conv(x)
        x = self.stem_act(self.stem_bn(x, keep.view(b, 1, t, 1, 1)))
        x = self.stem_pool(x)  # (B, C, T, H', W')
        c, h, w = x.shape[1], x.shape[3], x.shape[4]
        x = x.transpose(1, 2).reshape(b * t, c, h, w)  # (B*T, C, H', W')
        valid = keep.reshape(b * t, 1, 1, 1)
        for block in self.trunk:
            x = block(x, valid)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)  # (B*T, C)
        hidden = x.view(b, t, -1) * keep.unsqueeze(-1).to(x.dtype)  # (B, T, C)
        return EncoderOutput(hidden=hidden, lengths=video_lens, layers=[], frame_rate=self.frame_rate)


def lip_resnet18(act: ActLayer = prelu, crop: int = 88, flip: bool = True) -> LipEncoder:
    """AV-HuBERT's lip encoder: 64-channel 3D stem, ResNet-18 trunk, 512-d frames."""
    return LipEncoder(64, (64, 128, 256, 512), (2, 2, 2, 2), act, crop, flip)


def lip_small(crop: int = 88, flip: bool = True) -> LipEncoder:
    """A lip encoder for CPUs: AV-HuBERT's layout on a sixteenth of the pixels (``pool=4``: 22x22),
    16..128 channels, one block a stage, 128-d frames."""
    return LipEncoder(16, (16, 32, 64, 128), (1, 1, 1, 1), prelu, crop, flip, pool=4)


def lip_tiny(crop: int = 88, flip: bool = True) -> LipEncoder:
    """A narrow lip encoder for tests and CPU demos: same layout, 8..64 channels, one block a stage."""
    return LipEncoder(8, (8, 16, 32, 64), (1, 1, 1, 1), prelu, crop, flip)
