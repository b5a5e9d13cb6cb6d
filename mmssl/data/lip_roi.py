"""Mouth regions of interest from face video, ready for lip encoders (the library of
``mmssl data lips``, ``mmssl.commands.data_lips``).

For each video: find the mouth in every frame, smooth its track over time, crop a square
around it, resize to 96x96 grayscale (AV-HuBERT's stored size, from which training takes
random 88x88 windows; ``--size 88`` keeps only the centre 88x88), at 25 fps, muxed with the
clip's audio into an mp4 (PyAV: H.264 video, AAC audio).

Where the mouth comes from (nothing is downloaded):

* ``--landmarks DIR``: the 68-point landmark files AV-HuBERT users already have
  (``<video stem>.pkl``, a list with one ``(68, 2)`` array or None per frame, or ``.npy``
  ``(T, 68, 2)``); the mouth is points 48-67 (iBUG 300-W numbering).
* ``--face-model FILE``: OpenCV's DNN face detector ``cv2.FaceDetectorYN`` (a YuNet ``.onnx``
  the user provides); its two mouth-corner landmarks give the mouth.
* otherwise a cascade face detector: OpenCV's Haar frontal-face cascade where the OpenCV build
  ships ``cv2.CascadeClassifier`` and ``cv2.data.haarcascades``, else scikit-image's LBP
  frontal-face cascade (bundled with scikit-image); the mouth is placed at a fixed spot of the
  face box (``MOUTH_IN_BOX``).

Frames where nothing is found take the track interpolated from their neighbours; a video
with no detection at all is an error naming the file.

Shape legend: T frames, H/W pixels.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Protocol

import av
import cv2
import numpy as np

from mmssl.constants import SAMPLE_RATE, VIDEO_FPS
from mmssl.data.io import load_audio, load_video, probe
from mmssl.errors import ConfigError, DataError
from mmssl.files import atomic_path

STORE_SIZE = 96  # AV-HuBERT stores 96x96 crops ...
CROP_SIZE = 88  # ... and trains on 88x88 windows
# Mouth centre inside a face box, as fractions of (width, height) from its top-left corner, and
# the crop side as a fraction of the box width. "lbp": read off scikit-image's astronaut photo
# (a tight eyes-to-mouth box); "haar": OpenCV's frontal-face boxes reach higher up the forehead
# and lower down the chin, so the mouth sits a little higher in them (an estimate).
MOUTH_IN_BOX = {"haar": (0.5, 0.78, 0.6), "lbp": (0.5, 0.81, 0.7)}
# crop side / mouth width, for detectors that see the mouth corners
SIDE_PER_MOUTH_WIDTH = 1.8

Track = tuple[np.ndarray, np.ndarray]  # centres (T, 2) as (x, y), crop sides (T,)


class MouthFinder(Protocol):
    def __call__(self, gray: np.ndarray) -> tuple[float, float, float] | None:
        """``gray (H, W)`` uint8 -> mouth ``(x, y, crop side)`` in pixels, or None."""


def _largest(boxes: list[tuple[float, float, float, float]]) -> tuple[float, float, float, float] | None:
    return max(boxes, key=lambda b: b[2] * b[3]) if boxes else None


class CascadeMouths:
    """The largest face of a cascade detector; the mouth at ``MOUTH_IN_BOX[kind]`` of its box."""

    def __init__(
        self, detect: Callable[[np.ndarray], list[tuple[float, float, float, float]]], kind: str
    ) -> None:
        self.detect, self.kind = detect, kind

    def __call__(self, gray: np.ndarray) -> tuple[float, float, float] | None:
        box = _largest(self.detect(gray))
        if box is None:
            return None
        x, y, w, h = box
        fx, fy, side = MOUTH_IN_BOX[self.kind]
        return x + fx * w, y + fy * h, side * w


def opencv_cascade() -> CascadeMouths | None:
    """OpenCV's Haar frontal-face cascade, when this OpenCV build ships it."""
    if not hasattr(cv2, "CascadeClassifier") or not hasattr(cv2, "data"):
        return None
    path = os.path.join(getattr(cv2.data, "haarcascades", ""), "haarcascade_frontalface_default.xml")
    if not os.path.isfile(path):
        return None
    cascade = cv2.CascadeClassifier(path)

    def detect(gray: np.ndarray) -> list[tuple[float, float, float, float]]:
        found = cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(40, 40))
        return [tuple(map(float, b)) for b in found]

    return CascadeMouths(detect, "haar")


def skimage_cascade() -> CascadeMouths | None:
    """scikit-image's LBP frontal-face cascade (shipped inside scikit-image), if installed."""
    try:
        # lazy: scikit-image, only when OpenCV has no face cascade
        from skimage import data as skdata
        from skimage.feature import Cascade
    except ImportError:
        return None
    cascade = Cascade(skdata.lbp_frontal_face_cascade_filename())

    def detect(gray: np.ndarray) -> list[tuple[float, float, float, float]]:
        h, w = gray.shape
        smallest = max(24, min(h, w) // 8)
        found = cascade.detect_multi_scale(
            img=gray.astype(np.float32) / 255.0,
            scale_factor=1.2,
            step_ratio=1,
            min_size=(smallest, smallest),
            max_size=(min(h, w), min(h, w)),
        )
        return [(float(f["c"]), float(f["r"]), float(f["width"]), float(f["height"])) for f in found]

    return CascadeMouths(detect, "lbp")


class YuNetMouths:
    """OpenCV's DNN face detector (``cv2.FaceDetectorYN``) from a user-provided model file; the
    mouth is the midpoint of its two mouth-corner landmarks."""

    def __init__(self, model: str | os.PathLike, score: float = 0.6) -> None:
        if not Path(model).is_file():
            raise ConfigError(f"face model {model} not found")
        self.detector = cv2.FaceDetectorYN.create(str(model), "", (320, 320), score)

    def __call__(self, gray: np.ndarray) -> tuple[float, float, float] | None:
        h, w = gray.shape
        self.detector.setInputSize((w, h))
        _, faces = self.detector.detect(cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR))
        if faces is None or len(faces) == 0:
            return None
        face = max(faces, key=lambda f: f[2] * f[3])
        right, left = face[10:12], face[12:14]  # mouth corners (YuNet landmark order)
        centre = (right + left) / 2
        return float(centre[0]), float(centre[1]), SIDE_PER_MOUTH_WIDTH * float(np.linalg.norm(right - left))


def default_finder() -> MouthFinder:
    finder = opencv_cascade() or skimage_cascade()
    if finder is None:
        raise ConfigError(
            "no face detector available: this OpenCV build has no Haar cascades and scikit-image "
            "is not installed; pass --landmarks DIR or --face-model FILE (a YuNet .onnx)"
        )
    return finder


def find_mouths(frames: np.ndarray, finder: MouthFinder) -> Track:
    """``frames (T, H, W)`` uint8 -> raw track: centres ``(T, 2)`` and sides ``(T,)``, NaN
    where the finder saw nothing."""
    centres = np.full((len(frames), 2), np.nan)
    sides = np.full(len(frames), np.nan)
    for t, frame in enumerate(frames):
        found = finder(frame)
        if found is not None:
            centres[t], sides[t] = found[:2], found[2]
    return centres, sides


def read_landmarks(path: str | os.PathLike) -> list[np.ndarray | None]:
    """68-point landmarks per frame from ``.pkl`` (a list of ``(68, 2)`` arrays or None, as
    AV-HuBERT's preparation scripts write) or ``.npy`` (``(T, 68, 2)``, NaN for a missing frame)."""
    path = Path(path)
    try:
        if path.suffix == ".npy":
            data = list(np.load(path, allow_pickle=False))
        elif path.suffix == ".pkl":
            with open(path, "rb") as f:
                data = list(pickle.load(f))
        else:
            raise DataError(f"{path}: landmarks must be .pkl or .npy")
    except (OSError, ValueError, pickle.UnpicklingError, EOFError) as err:
        raise DataError(f"{path}: cannot read landmarks: {err}") from err
    frames: list[np.ndarray | None] = []
    for i, item in enumerate(data):
        if item is None:
            frames.append(None)
            continue
        arr = np.asarray(item, dtype=np.float64).reshape(-1, 2)
        if arr.shape[0] != 68:
            raise DataError(f"{path}: frame {i} has {arr.shape[0]} landmarks, expected 68")
        frames.append(None if np.isnan(arr).any() else arr)
    return frames


def landmark_track(landmarks: list[np.ndarray | None]) -> Track:
    """Raw track from 68-point landmarks: the mean of the mouth points 48-67, and a side of
    ``SIDE_PER_MOUTH_WIDTH`` times the corner-to-corner width (points 48 and 54)."""
    centres = np.full((len(landmarks), 2), np.nan)
    sides = np.full(len(landmarks), np.nan)
    for t, pts in enumerate(landmarks):
        if pts is not None:
            centres[t] = pts[48:68].mean(0)
            sides[t] = SIDE_PER_MOUTH_WIDTH * np.linalg.norm(pts[54] - pts[48])
    return centres, sides


def smooth_track(centres: np.ndarray, sides: np.ndarray, window: int = 5, what: str = "video") -> Track:
    """Fill frames without a detection by linear interpolation (held at the ends), then a
    centred moving average of up to ``window`` frames that shrinks symmetrically at the ends
    (so steady motion is followed without lag). ``what`` names the video in errors."""
    found = ~np.isnan(sides)
    if not found.any():
        raise DataError(f"{what}: no face / mouth found in any of its {len(sides)} frames")
    t = np.arange(len(sides))
    track = np.stack([centres[:, 0], centres[:, 1], sides], 1)
    filled = np.stack([np.interp(t, t[found], track[found, j]) for j in range(3)], 1)
    half = max(window, 1) // 2
    out = np.empty_like(filled)
    for i in range(len(t)):
        h = min(half, i, len(t) - 1 - i)
        out[i] = filled[i - h : i + h + 1].mean(0)
    return out[:, :2], out[:, 2]


def crop_mouths(
    frames: np.ndarray, centres: np.ndarray, sides: np.ndarray, size: int = CROP_SIZE
) -> np.ndarray:
    """Square crops around the track, resized to 96x96, centre ``size x size`` kept.
    ``frames (T, H, W)`` uint8 -> ``(T, size, size)`` uint8. Outside the frame is edge-replicated."""
    if size > STORE_SIZE:
        raise ConfigError(f"crop size {size} is larger than the {STORE_SIZE}x{STORE_SIZE} stored crop")
    out = np.empty((len(frames), size, size), np.uint8)
    off = (STORE_SIZE - size) // 2
    for t, frame in enumerate(frames):
        (cx, cy), side = centres[t], max(float(sides[t]), 8.0)
        # affine map from the square window to the 96x96 crop; sub-pixel, borders replicated
        scale = STORE_SIZE / side
        m = np.array([[scale, 0, STORE_SIZE / 2 - scale * cx], [0, scale, STORE_SIZE / 2 - scale * cy]])
        crop = cv2.warpAffine(
            frame, m, (STORE_SIZE, STORE_SIZE), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REPLICATE
        )
        out[t] = crop[off : off + size, off : off + size]
    return out


def write_av(
    path: str | os.PathLike,
    frames: np.ndarray,
    audio: np.ndarray | None,
    fps: float = VIDEO_FPS,
    sample_rate: int = SAMPLE_RATE,
) -> None:
    """Mux grayscale ``frames (T, H, W)`` uint8 (H.264) and mono ``audio (S,)`` float in
    [-1, 1] (AAC) into an mp4, written to a temporary name then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, av.open(str(tmp), "w") as out:
        vs = out.add_stream("libx264", rate=int(round(fps)), options={"crf": "15"})
        vs.width, vs.height, vs.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        a_s = out.add_stream("aac", rate=sample_rate, layout="mono") if audio is not None else None
        for frame in frames:
            for packet in vs.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="gray")):
                out.mux(packet)
        for packet in vs.encode():
            out.mux(packet)
        if a_s is not None and audio is not None:
            pcm = (np.clip(audio, -1, 1) * 32767).astype(np.int16).reshape(1, -1)
            chunk = 1024
            for start in range(0, pcm.shape[1], chunk):
                af = av.AudioFrame.from_ndarray(pcm[:, start : start + chunk], format="s16", layout="mono")
                af.sample_rate = sample_rate
                af.pts, af.time_base = start, Fraction(1, sample_rate)  # timed: the mp4 marks the AAC priming
                for packet in a_s.encode(af):
                    out.mux(packet)
            for packet in a_s.encode():
                out.mux(packet)


def mouth_track(
    frames: np.ndarray,
    finder: MouthFinder | None,
    landmarks: str | os.PathLike | None,
    window: int,
    what: str,
) -> Track:
    """The smoothed mouth track of ``frames (T, H, W)``, from landmarks when given."""
    if landmarks is not None:
        marks = read_landmarks(landmarks)
        if len(marks) != len(frames):
            raise DataError(
                f"{landmarks}: {len(marks)} landmark frames for {len(frames)} video frames of {what}"
            )
        raw = landmark_track(marks)
    else:
        raw = find_mouths(frames, finder or default_finder())
    return smooth_track(*raw, window=window, what=what)


def process_video(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    finder: MouthFinder | None = None,
    landmarks: str | os.PathLike | None = None,
    size: int = CROP_SIZE,
    window: int = 5,
) -> dict:
    """Crop the mouth track of video ``src`` into ``dst`` (mp4 with the clip's audio, if any).
    Returns ``{"video_frames", "audio_samples"}`` for the manifest."""
    frames = load_video(src, VIDEO_FPS).numpy()  # (T, H, W) at 25 fps
    centres, sides = mouth_track(frames, finder, landmarks, window, str(src))
    crops = crop_mouths(frames, centres, sides, size)
    audio = load_audio(src).numpy() if probe(src).has_audio else None
    if audio is not None:  # AAC sources decode with encoder padding: keep the video's span
        audio = audio[: int(round(len(crops) / VIDEO_FPS * SAMPLE_RATE))]
    write_av(dst, crops, audio)
    return {"video_frames": len(crops), "audio_samples": None if audio is None else len(audio)}


def landmark_file(folder: str | None, video: Path, record_id: str | None = None) -> Path | None:
    """``<folder>/<record id>.pkl|.npy`` (ids such as LRS3's ``trainval/<talk>/<clip>`` follow
    AV-HuBERT's ``landmark/<split>/<talk>/<clip>.pkl`` tree), else ``<folder>/<video stem>``."""
    if folder is None:
        return None
    names = list(dict.fromkeys([*([record_id] if record_id else []), video.stem]))  # once each
    tried = [f"{name}{suffix}" for name in names for suffix in (".pkl", ".npy")]
    for name in tried:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    raise DataError(f"{video}: no landmark file in {folder} (looked for {', '.join(tried)})")
