"""Small media files written with PyAV, for tests that need real containers and codecs.

Every writer returns what it encoded (the waveform ``(C, S)`` float in [-1, 1] and/or the
grayscale frames ``(T, H, W)`` uint8), so a test can compare a decode against it.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def tone(num_samples: int, sample_rate: int = 16000, channels: int = 1, freq: float = 440.0) -> np.ndarray:
    """A sine (one frequency per channel), ``(C, S)`` float32, amplitude 0.5."""
    t = np.arange(num_samples) / sample_rate
    rows = [0.5 * np.sin(2 * np.pi * freq * (c + 1) * t) for c in range(channels)]
    return np.stack(rows).astype(np.float32)


def moving_frames(num_frames: int, height: int = 96, width: int = 96) -> np.ndarray:
    """A bright square moving one step per frame over a gradient, ``(T, H, W)`` uint8.

    Frame ``i`` has mean brightness rising with ``i`` (a test can tell frames apart by mean).
    """
    frames = np.zeros((num_frames, height, width), np.uint8)
    for i in range(num_frames):
        frames[i] = min(40 + 4 * i, 200)
        x = (3 * i) % (width - 16)
        frames[i, 8:24, x : x + 16] = 255
    return frames


def _audio_stream(container, channels: int, sample_rate: int, codec: str):
    layout = "mono" if channels == 1 else "stereo"
    stream = container.add_stream(codec, rate=sample_rate, layout=layout)
    stream.time_base = Fraction(1, sample_rate)
    return stream


def _encode_audio(container, stream, data: np.ndarray, timestamps: bool = True) -> None:
    ctx = stream.codec_context
    fmt, layout = ctx.format.name, ctx.layout.name
    chunk = ctx.frame_size or 1024
    for start in range(0, data.shape[1], chunk):
        part = data[:, start : start + chunk]
        frame = _audio_frame(part, fmt, layout, ctx.sample_rate)
        frame.pts = start if timestamps else None
        for packet in stream.encode(frame):
            container.mux(packet)
    _flush(container, stream)


def _audio_frame(part: np.ndarray, fmt: str, layout: str, sample_rate: int) -> av.AudioFrame:
    if fmt.startswith("s16"):
        ints = np.clip(np.round(part * 32767), -32768, 32767).astype(np.int16)
        array = ints if fmt.endswith("p") else ints.T.reshape(1, -1)
    else:
        floats = part.astype(np.float32)
        array = floats if fmt.endswith("p") else floats.T.reshape(1, -1)
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(array), format=fmt, layout=layout)
    frame.sample_rate = sample_rate
    return frame


def _video_stream(container, height: int, width: int, fps: float, codec: str):
    stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
    stream.height, stream.width = height, width
    stream.pix_fmt = "yuv420p"
    if codec == "libx264":
        stream.options = {"crf": "10", "preset": "ultrafast"}
    else:
        stream.bit_rate = 2_000_000
    return stream


def _encode_video(container, stream, frames: np.ndarray) -> None:
    for i, gray in enumerate(frames):
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(gray), format="gray")
        frame.pts = i
        for packet in stream.encode(frame):
            container.mux(packet)
    _flush(container, stream)


def _flush(container, stream) -> None:
    for packet in stream.encode(None):
        container.mux(packet)


def write_wav(
    path: str | Path, data: np.ndarray, sample_rate: int = 16000, codec: str = "pcm_s16le"
) -> np.ndarray:
    """Write ``data (C, S)`` (or ``(S,)``) as a wav; ``codec`` ``pcm_f32le`` keeps floats (and NaN)."""
    data = np.atleast_2d(np.asarray(data, np.float32))
    with av.open(str(path), "w", format="wav") as container:
        stream = _audio_stream(container, data.shape[0], sample_rate, codec)
        container.start_encoding()  # writes the header even when there are no samples
        _encode_audio(container, stream, data)
    return data


def write_av(
    path: str | Path,
    frames: np.ndarray | None,
    audio: np.ndarray | None,
    fps: float = 25.0,
    sample_rate: int = 16000,
    video_codec: str = "libx264",
    audio_codec: str = "aac",
    audio_timestamps: bool = True,
) -> None:
    """An mp4/mkv with ``frames (T, H, W)`` uint8 and/or ``audio (C, S)`` float.

    mp4 + libx264/mpeg4 + aac, or mkv + mpeg4 + pcm_s16le (which round-trips audio exactly).
    AAC in mp4: with ``audio_timestamps`` the encoder's packets start at -1024 and the muxer
    writes an edit list that marks the priming, the layout ffmpeg's command line writes (seen
    with ffmpeg 5.1: same edit list, first packet and declared duration); without, the audio
    frames carry no pts, as in scripts that never set them, and nothing marks the priming.
    """
    with av.open(str(path), "w") as container:
        if frames is not None:
            vstream = _video_stream(container, *frames.shape[1:3], fps, video_codec)
        if audio is not None:
            audio = np.atleast_2d(audio)
            astream = _audio_stream(container, audio.shape[0], sample_rate, audio_codec)
        if frames is not None:
            _encode_video(container, vstream, frames)
        if audio is not None:
            _encode_audio(container, astream, audio, audio_timestamps)


def write_adts(path: str | Path, data: np.ndarray, sample_rate: int = 16000) -> np.ndarray:
    """Raw AAC in ADTS frames (``.aac``) from ``data (C, S)``: no container, so nothing marks
    the priming and the only duration is FFmpeg's estimate from the bit rate."""
    data = np.atleast_2d(np.asarray(data, np.float32))
    with av.open(str(path), "w", format="adts") as container:
        stream = _audio_stream(container, data.shape[0], sample_rate, "aac")
        _encode_audio(container, stream, data)
    return data


def clicks(num_samples: int, at: list[int], width: int = 8) -> np.ndarray:
    """Silence with a click (``width`` samples at 0.8) starting at each sample of ``at``, ``(1, S)``."""
    audio = np.zeros((1, num_samples), np.float32)
    for start in at:
        audio[0, start : start + width] = 0.8
    return audio


def write_image(path: str | Path, rgb: np.ndarray) -> None:
    """Write ``rgb (H, W, 3)`` uint8 as a single-image png/jpg."""
    with av.open(str(path), "w", format="image2") as container:
        codec = "png" if str(path).endswith(".png") else "mjpeg"
        stream = container.add_stream(codec, rate=1)
        stream.height, stream.width = rgb.shape[:2]
        stream.pix_fmt = "rgb24" if codec == "png" else "yuvj420p"
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        for packet in stream.encode(frame):
            container.mux(packet)
        _flush(container, stream)
