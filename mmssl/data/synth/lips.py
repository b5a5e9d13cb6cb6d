"""Mouth-region video from a phoneme timeline: 25 fps, 88x88 grayscale.

Each phoneme moves the mouth toward its viseme targets (``phonemes.VISEMES``: opening, width,
rounding, teeth and tongue visibility). The targets are laid on a 5 ms grid, rounding is
anticipated up to 120 ms ahead (anticipatory lip rounding before /u/, /w/, /sh/), every track
is smoothed (coarticulation) and bilabial closures are kept complete. A per-speaker
``Appearance`` (skin and lip tone, lip thickness, mouth size, offset) and per-utterance
``Jitter`` (head motion, lighting, blur, noise) make the pictures vary the way real lip crops do.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy.ndimage import gaussian_filter1d, maximum_filter1d

from mmssl.constants import SAMPLE_RATE, VIDEO_FPS
from mmssl.data.synth.phonemes import VISEMES, visemes

SAMPLES_PER_FRAME = round(SAMPLE_RATE / VIDEO_FPS)  # 640
SIZE = 88
_GRID = 80  # samples per trajectory step (5 ms at 16 kHz)
_STEPS_PER_FRAME = SAMPLES_PER_FRAME // _GRID
_SUPER = 2  # draw at 2x, then area-downsample (anti-aliasing)
OPEN, WIDTH, ROUND, TEETH, TONGUE = range(5)
_CIRCLE = np.stack([np.cos(np.linspace(0, 2 * np.pi, 12)), np.sin(np.linspace(0, 2 * np.pi, 12))], 1)
_HALF = np.stack([np.cos(np.linspace(0, np.pi, 10)), np.sin(np.linspace(0, np.pi, 10))], 1)


@dataclass(frozen=True)
class Appearance:
    """How one speaker's mouth looks (fixed for all their utterances)."""

    skin: float  # grey level of the skin, 0-255
    lip: float  # grey level of the lips
    lip_thickness: float  # pixels
    half_width: float  # pixels, mouth at rest
    max_opening: float  # pixels, fully open
    offset: tuple[float, float]  # mouth centre offset from the crop centre, pixels
    articulation: float  # how far this speaker moves toward each target (hypo/hyper-articulation)

    @classmethod
    def sample(cls, rng: np.random.Generator) -> Appearance:
        skin = float(rng.uniform(110, 200))
        return cls(
            skin=skin,
            lip=float(skin - rng.uniform(25, 60)),
            lip_thickness=float(rng.uniform(4.0, 8.0)),
            half_width=float(rng.uniform(22, 30)),
            max_opening=float(rng.uniform(18, 28)),
            offset=(float(rng.uniform(-4, 4)), float(rng.uniform(-3, 3))),
            articulation=float(rng.uniform(0.75, 1.15)),
        )


@dataclass(frozen=True)
class Jitter:
    """Per-utterance nuisance: head motion, lighting, blur, sensor noise."""

    motion_amp: tuple[float, float]
    motion_freq: tuple[float, float]
    motion_phase: tuple[float, float]
    tilt: float  # degrees
    light: float  # brightness gain
    light_slope: float  # left-right lighting gradient
    blur: float  # Gaussian sigma, pixels
    noise: float  # std of per-pixel noise, grey levels

    @classmethod
    def sample(cls, rng: np.random.Generator) -> Jitter:
        return cls(
            motion_amp=(float(rng.uniform(0.3, 2.0)), float(rng.uniform(0.3, 1.5))),
            motion_freq=(float(rng.uniform(0.2, 1.0)), float(rng.uniform(0.2, 1.0))),
            motion_phase=(float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(0, 2 * np.pi))),
            tilt=float(rng.uniform(-5, 5)),
            light=float(rng.uniform(0.8, 1.2)),
            light_slope=float(rng.uniform(-0.25, 0.25)),
            blur=float(rng.uniform(0.4, 1.3)),
            noise=float(rng.uniform(1.0, 4.0)),
        )


def mouth_tracks(
    phonemes: list[tuple[str, int, int]], num_frames: int, articulation: float = 1.0
) -> np.ndarray:
    """Mouth parameters per video frame, ``(F, 5)`` in [0, 1], from ``(phoneme, start, end)`` in samples.

    Frame ``f`` covers samples ``[640 f, 640 (f + 1))`` and averages the 5 ms trajectory inside it.
    """
    steps = num_frames * _STEPS_PER_FRAME
    rest = np.asarray(VISEMES["neutral"], dtype=np.float64)
    target = np.tile(rest, (steps, 1))
    closed = np.zeros(steps, dtype=bool)
    for name, start, end in phonemes:
        parts = visemes(name)
        bounds = np.linspace(start, end, len(parts) + 1)
        for k, vis in enumerate(parts):  # a diphthong glides through its two targets
            a = int(bounds[k] // _GRID)
            b = max(a + 1, int(np.ceil(bounds[k + 1] / _GRID)))
            target[a:b] = VISEMES[vis]
            if vis == "closed":
                core = (b - a) // 4
                closed[a + core : max(a + core + 1, b - core)] = True
    # movement amplitude around the neutral mouth, per speaker
    target = rest + articulation * (target - rest)
    # anticipatory rounding: the lips start rounding up to 120 ms before a rounded segment
    ahead = 24
    future = maximum_filter1d(target[:, ROUND], size=ahead + 1, origin=-(ahead // 2), mode="nearest")
    target[:, ROUND] = np.maximum(target[:, ROUND], 0.8 * future)
    sigmas = (3.0, 5.0, 6.0, 4.0, 4.0)  # coarticulation, in 5 ms steps (opening moves fastest)
    track = np.stack([gaussian_filter1d(target[:, c], sigmas[c], mode="nearest") for c in range(5)], axis=1)
    # bilabial closure is complete whatever the neighbours (the cue that survives in lip reading)
    track[closed, OPEN] = 0.0
    track[:, OPEN] = gaussian_filter1d(track[:, OPEN], 1.0, mode="nearest")
    track = np.clip(track, 0.0, 1.0)
    return track.reshape(num_frames, _STEPS_PER_FRAME, 5).mean(axis=1)  # (F, 5)


def _lip_polygons(params: np.ndarray, look: Appearance, centre: tuple[float, float]):
    opening, width, rounding, teeth, tongue = (float(v) for v in params)
    hw = look.half_width * (0.78 + 0.45 * width) * (1.0 - 0.25 * rounding)
    oh = opening * look.max_opening * (1.0 - 0.15 * rounding)
    th = look.lip_thickness * (1.0 + 0.5 * rounding)
    cx, cy = centre
    xs = np.linspace(-1.0, 1.0, 25)
    profile = np.sqrt(np.clip(1.0 - xs**2, 0.0, 1.0))
    bow = 1.0 - 0.25 * np.exp(-((xs / 0.18) ** 2))  # cupid's bow dip in the upper lip
    inner_top = cy - 0.5 * oh * profile
    inner_bot = cy + 0.5 * oh * profile
    outer_top = inner_top - th * (0.35 + 0.65 * profile) * bow
    outer_bot = inner_bot + 1.2 * th * (0.35 + 0.65 * profile)
    x = cx + hw * xs
    outer = np.concatenate([np.stack([x, outer_top], 1), np.stack([x[::-1], outer_bot[::-1]], 1)])
    inner = np.concatenate(
        [
            np.stack([x * 0.9 + cx * 0.1, inner_top], 1),
            np.stack([(x * 0.9 + cx * 0.1)[::-1], inner_bot[::-1]], 1),
        ]
    )
    return outer, inner, hw, oh, teeth, tongue, rounding


def _poly(img: np.ndarray, pts: np.ndarray, value: float, rot: np.ndarray) -> None:
    pts = pts @ rot[:, :2].T + rot[:, 2]
    cv2.fillPoly(
        img, [np.round(pts * _SUPER * 4).astype(np.int32)], float(value), lineType=cv2.LINE_8, shift=2
    )


def lighting(jitter: Jitter) -> np.ndarray:
    """Brightness gain over the (super-sampled) crop: left-right slope, darker toward the chin."""
    s = SIZE * _SUPER
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
    return jitter.light * (1.0 + jitter.light_slope * (xx - 0.5)) * (1.05 - 0.15 * yy)


def render_frame(
    params: np.ndarray, look: Appearance, jitter: Jitter, t: float, noise: np.ndarray, light: np.ndarray
) -> np.ndarray:
    """One 88x88 uint8 mouth crop for mouth parameters ``(5,)`` at time ``t`` seconds;
    ``noise (88, 88)`` is added after blurring, ``light`` comes from ``lighting(jitter)``."""
    s = SIZE * _SUPER
    img = np.full((s, s), look.skin, dtype=np.float32)
    dx = jitter.motion_amp[0] * np.sin(2 * np.pi * jitter.motion_freq[0] * t + jitter.motion_phase[0])
    dy = jitter.motion_amp[1] * np.sin(2 * np.pi * jitter.motion_freq[1] * t + jitter.motion_phase[1])
    centre = (SIZE / 2 + look.offset[0] + dx, SIZE * 0.55 + look.offset[1] + dy)
    rot = cv2.getRotationMatrix2D(centre, jitter.tilt, 1.0)
    # nostril shadows and the chin crease frame the mouth like a real crop
    for sx in (-1, 1):
        nostril = np.stack([centre[0] + sx * 9 + 4 * _CIRCLE[:, 0], 6 + 2 * _CIRCLE[:, 1]], 1)
        _poly(img, nostril, look.skin * 0.55, rot)
    outer, inner, hw, oh, teeth, tongue, rounding = _lip_polygons(params, look, centre)
    shadow = outer.copy()
    shadow[:, 0] = centre[0] + 1.12 * (shadow[:, 0] - centre[0])
    shadow[:, 1] = centre[1] + 1.15 * (shadow[:, 1] - centre[1]) + 1.0
    _poly(img, shadow, look.skin * (0.92 - 0.12 * rounding), rot)  # protruded lips cast a shadow
    _poly(img, outer, look.lip, rot)
    if oh > 0.6:
        _poly(img, inner, 28.0, rot)
        top = float(inner[:, 1].min())
        if tongue > 0.05:  # tongue body low in the mouth, tip between the teeth for /th/
            tw, tip = 0.45 * hw, 0.6 * oh * tongue
            body = np.stack([centre[0] + tw * _HALF[:, 0], centre[1] + 0.5 * oh - tip * _HALF[:, 1]], 1)
            _poly(img, body, 95.0, rot)
        if teeth > 0.05:
            band = min(0.45 * oh, 5.0) * teeth
            half = 0.6 * hw
            _poly(
                img,
                np.array(
                    [
                        [centre[0] - half, top],
                        [centre[0] + half, top],
                        [centre[0] + half, top + band],
                        [centre[0] - half, top + band],
                    ]
                ),
                215.0,
                rot,
            )
    if teeth > 0.5 and oh <= 3.0:  # labiodental / sibilant: teeth show over the lower lip
        band = 2.5 * teeth
        half = 0.55 * hw
        _poly(
            img,
            np.array(
                [
                    [centre[0] - half, centre[1] - 0.5],
                    [centre[0] + half, centre[1] - 0.5],
                    [centre[0] + half, centre[1] + band],
                    [centre[0] - half, centre[1] + band],
                ]
            ),
            205.0,
            rot,
        )
    img = cv2.resize(img * light, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    img = cv2.GaussianBlur(img, (0, 0), jitter.blur)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def render_video(
    phonemes: list[tuple[str, int, int]],
    num_frames: int,
    look: Appearance,
    jitter: Jitter,
    rng: np.random.Generator,
) -> np.ndarray:
    """Mouth video ``(F, 88, 88)`` uint8 for a phoneme timeline in 16 kHz samples."""
    tracks = mouth_tracks(phonemes, num_frames, look.articulation)
    noise = rng.standard_normal(size=(num_frames, SIZE, SIZE), dtype=np.float32) * np.float32(jitter.noise)
    light = lighting(jitter)
    frames = [
        render_frame(tracks[f], look, jitter, (f + 0.5) / VIDEO_FPS, noise[f], light)
        for f in range(num_frames)
    ]
    return np.stack(frames) if frames else np.zeros((0, SIZE, SIZE), np.uint8)
