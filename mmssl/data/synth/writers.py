"""Writing the generated media: 16-bit wav, mp4 (H.264 grayscale video + AAC audio), PNG."""

from __future__ import annotations

import wave
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

from mmssl.constants import SAMPLE_RATE, VIDEO_FPS
from mmssl.errors import DataError


def write_wav(path: Path, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Mono 16-bit PCM; ``audio (S,)`` int16."""
    if audio.dtype != np.int16:
        raise DataError(f"{path}: expected int16 samples, got {audio.dtype}")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(audio.tobytes())


def write_mp4(
    path: Path,
    frames: np.ndarray,
    audio: np.ndarray,
    fps: int = round(VIDEO_FPS),
    sample_rate: int = SAMPLE_RATE,
) -> None:
    """``frames (T, H, W)`` uint8 grayscale as H.264 (yuv420p) and ``audio (S,)`` int16 as AAC,
    in one mp4. x264's ``ultrafast`` preset on one thread has no macroblock-tree lookahead,
    whose output was seen to vary from run to run, so the same frames give the same bytes;
    the AAC encoder uses its fast coder (the default two-loop search is 3x slower)."""
    with av.open(str(path), mode="w", format="mp4") as container:
        video = container.add_stream("libx264", rate=fps)
        video.width, video.height = int(frames.shape[2]), int(frames.shape[1])
        video.pix_fmt = "yuv420p"
        video.codec_context.thread_count = 1
        video.options = {"crf": "18", "preset": "ultrafast", "x264-params": "threads=1"}
        sound = container.add_stream("aac", rate=sample_rate)
        sound.layout = "mono"
        sound.options = {"aac_coder": "fast"}
        for index, gray in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(gray, format="gray")
            frame.pts = index
            frame.time_base = Fraction(1, fps)
            for packet in video.encode(frame):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        block = 1024  # AAC frame size
        for start in range(0, len(audio), block):
            chunk = audio[start : start + block].reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="s16", layout="mono")
            frame.sample_rate = sample_rate
            frame.pts = start
            frame.time_base = Fraction(1, sample_rate)
            for packet in sound.encode(frame):
                container.mux(packet)
        for packet in sound.encode():
            container.mux(packet)


def write_png(path: Path, rgb: np.ndarray) -> None:
    """``rgb (H, W, 3)`` uint8 as PNG."""
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise DataError(f"{path}: cannot write PNG")
