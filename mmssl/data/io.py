"""Decoding media with PyAV: audio to 16 kHz mono float, video to 25 fps grayscale, images to RGB.

Shape legend: S samples, T frames, H/W pixels. Every failure (missing file, corrupt or
truncated container, no stream of the wanted kind, zero length, NaN samples) is raised as
``mmssl.errors.DataError`` whose message starts with the file, never as a PyAV traceback.

Codec delay: an AAC encoder emits ``AAC_PRIMING`` samples of priming before the audio and pads
the last frame. Where the container marks the priming (an mp4 edit list, as ffmpeg writes it
and PyAV when the audio frames carry timestamps; Matroska's codec delay), FFmpeg's demuxer gives
the priming packets negative timestamps and its decoder drops their samples. Where it does not
(an mp4 muxed from untimed frames, ADTS ``.aac``, Matroska from older ffmpeg), the decoder
returns the priming as audio and everything in the clip sounds that much late; the loader drops
it, and ``probe`` counts without it. The end padding is cut at the stream's declared duration.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import av
import numpy as np
import torch
import torchaudio.functional as AF
from av.video.reformatter import VideoReformatter
from torch import Tensor

from mmssl.constants import SAMPLE_RATE
from mmssl.errors import DataError

# Errors PyAV (and the OS under it) raise on a file it cannot use.
_DECODE_ERRORS = (av.FFmpegError, OSError, ValueError, RuntimeError, EOFError, IndexError)

# Samples of encoder delay at the start of an AAC stream: FFmpeg's encoder declares 1024 (its
# initial_padding, one AAC-LC frame). Other encoders may prime more (Apple's 2112), but a file
# that does not say how much leaves no better guess.
AAC_PRIMING = 1024


@dataclass(frozen=True)
class MediaInfo:
    """What a container says about itself, read without decoding.

    Durations in seconds; ``None`` where the file has no such stream or does not say.
    ``audio_samples`` and ``video_frames`` are the container's own counts (or estimates from
    duration x rate), at the file's native rates.
    """

    path: str
    duration: float | None
    audio_rate: int | None = None
    audio_channels: int | None = None
    audio_duration: float | None = None
    audio_samples: int | None = None
    video_fps: float | None = None
    video_frames: int | None = None
    video_duration: float | None = None
    width: int | None = None
    height: int | None = None

    @property
    def has_audio(self) -> bool:
        return self.audio_rate is not None

    @property
    def has_video(self) -> bool:
        return self.video_fps is not None


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise DataError(f"{path}: missing file")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a folder, not a media file")
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: empty file (0 bytes)")


# bytes of PCM per packet of FFmpeg's WAV demuxer (its ``max_size`` option): a 4-s 16 kHz clip
# comes in 15 packets and frames instead of 60, and each frame costs Python (to_ndarray, the
# conversion); larger packets cost more at open (FFmpeg reads the first whole: 1.7 ms at 64 KiB).
# An uploaded 4-s wav decodes in 0.9 ms instead of 1.3 (2-core AMD EPYC)
WAV_PACKET_BYTES = 8192


def _wav_hint(head: bytes) -> dict:
    """``av.open`` arguments for a file that starts with ``head``: for a RIFF/WAVE file, the
    format named, the stream search kept to the header and large packets (``WAV_PACKET_BYTES``).
    The WAVE header states every codec parameter, but by default FFmpeg reads up to 5 s of
    packets to look for them (about 5 ms, the larger part of decoding a short clip); other
    formats keep FFmpeg's full search."""
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return {"format": "wav", "options": {"probesize": "32", "max_size": str(WAV_PACKET_BYTES)}}
    return {}


@contextmanager
def _open(path: str | os.PathLike, what: str) -> Iterator[av.container.InputContainer]:
    """Open ``path`` for reading; any PyAV or OS failure inside becomes a ``DataError``."""
    path = os.fspath(path)
    _check_file(path)
    try:
        hint = {}
        if what == "audio":
            with open(path, "rb") as f:
                hint = _wav_hint(f.read(12))
        container = av.open(path, **hint)
    except _DECODE_ERRORS as err:
        raise DataError(f"{path}: cannot open ({_reason(err)})") from None
    try:
        yield container
    except _DECODE_ERRORS as err:
        raise DataError(f"{path}: cannot decode {what} ({_reason(err)})") from None
    finally:
        container.close()


def _reason(err: BaseException) -> str:
    text = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return text.replace("\n", " ")


def _seconds(value: int | None, time_base) -> float | None:
    if value is None or time_base is None:
        return None
    return float(value * time_base)


def probe(path: str | os.PathLike) -> MediaInfo:
    """Read a container's header: durations, rates, channels, frame size (no decoding)."""
    with _open(path, "header") as container:
        duration = container.duration / av.time_base if container.duration else None
        fields: dict = {}
        if container.streams.audio:
            a = container.streams.audio[0]
            a_dur = _seconds(a.duration, a.time_base) or duration
            if a_dur and a.codec_context.name == "aac":  # the declared length counts the priming
                a_dur = max(
                    0.0, a_dur - _priming(a, *_first_timestamps(container, a)) / a.codec_context.sample_rate
                )
            fields.update(
                audio_rate=a.codec_context.sample_rate,
                audio_channels=a.codec_context.channels,
                audio_duration=a_dur,
                audio_samples=round(a_dur * a.codec_context.sample_rate) if a_dur else None,
            )
        if container.streams.video:
            v = container.streams.video[0]
            rate = v.average_rate or v.guessed_rate
            v_dur = _seconds(v.duration, v.time_base) or duration
            frames = v.frames or (round(v_dur * rate) if v_dur and rate else None)
            fields.update(
                video_fps=float(rate) if rate else None,
                video_frames=frames,
                video_duration=v_dur,
                width=v.codec_context.width,
                height=v.codec_context.height,
            )
        return MediaInfo(path=os.fspath(path), duration=duration, **fields)


def _first_timestamps(container, stream) -> tuple[int | None, int | None]:
    """The pts of ``stream``'s first packet and of the first frame it decodes to (or None)."""
    first_packet = None
    for index, packet in enumerate(container.demux(stream)):
        if index == 0:
            first_packet = packet.pts
        for frame in packet.decode():
            return first_packet, frame.pts
    return first_packet, None


def _priming(stream, first_packet: int | None, first_frame: int | None) -> int:
    """Encoder priming samples left at the start of the decoded audio (module docstring).

    None, unless ``stream`` is AAC and nothing marks its priming: a container that marks it
    gives the first packet a negative pts, or the decoder skips samples, so its first frame
    starts after the first packet."""
    if stream.codec_context.name != "aac" or first_packet is None:
        return 0
    marked = first_packet < 0 or (first_frame is not None and first_frame > first_packet)
    return 0 if marked else AAC_PRIMING


# sample formats converted to float here, and the factor FFmpeg's own conversion (swresample,
# e.g. s16 -> flt: x * (1.0f / (1 << 15))) multiplies by, so the result is the same to the bit
_FLOAT_SCALE = {"s16": 1.0 / (1 << 15), "s32": 1.0 / (1 << 31), "flt": None, "dbl": None}


def _as_float(frame) -> np.ndarray | None:
    """An audio frame -> ``(C, S)`` float32 in [-1, 1), or None for a sample format left to
    swresample (u8, s64). The same numbers as ``AudioResampler(format="fltp")``, without its
    per-frame cost (a third of decoding a short PCM clip)."""
    name = frame.format.name
    planar = name.endswith("p")
    base = name[:-1] if planar else name
    if base not in _FLOAT_SCALE:
        return None
    data = frame.to_ndarray()
    if not planar:  # interleaved: (1, S * C) -> (C, S)
        data = data.reshape(-1, len(frame.layout.channels)).T
    scale = _FLOAT_SCALE[base]
    if scale is None:
        return np.ascontiguousarray(data, dtype=np.float32)
    return data.astype(np.float32) * np.float32(scale)


def _decode_audio(container, path: str) -> tuple[np.ndarray, int]:
    """All samples of the first audio stream, ``(C, S)`` float32 at the native rate, without
    the codec delay (module docstring): unmarked AAC priming is dropped from the start, and the
    end is cut at the stream's declared duration when at most one codec frame of padding
    lies beyond it (a longer excess means the duration was estimated, as for ADTS from the
    bit rate: every decoded sample is kept)."""
    if not container.streams.audio:
        raise DataError(f"{path}: no audio stream")
    stream = container.streams.audio[0]
    to_float = None  # made for a sample format _as_float does not convert
    chunks = []
    first_packet = first_frame = None
    for index, packet in enumerate(container.demux(stream)):
        if index == 0:
            first_packet = packet.pts
        for frame in packet.decode():
            if first_frame is None:
                first_frame = frame.pts
            converted = _as_float(frame)
            if converted is None:
                to_float = to_float or av.AudioResampler(format="fltp")  # sample format only
                chunks += [out.to_ndarray() for out in to_float.resample(frame)]
            else:
                chunks.append(converted)
    if to_float is not None:
        chunks += [out.to_ndarray() for out in to_float.resample(None)]
    rate = stream.codec_context.sample_rate
    if not chunks:
        raise DataError(f"{path}: zero-length audio")
    data = np.concatenate(chunks, axis=1)  # (C, S)
    declared = _seconds(stream.duration, stream.time_base)
    if declared:
        end = max(1, round(declared * rate))
        if 0 < data.shape[1] - end <= (stream.codec_context.frame_size or 0):
            data = data[:, :end]
    data = data[:, _priming(stream, first_packet, first_frame) :]
    if data.shape[1] == 0:
        raise DataError(f"{path}: zero-length audio")
    return data, rate


def load_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> Tensor:
    """Decode the first audio stream -> ``(S,)`` float32 mono in [-1, 1] at ``sample_rate``.

    Channels are averaged; other rates are resampled (``torchaudio.functional.resample``,
    windowed sinc), giving ``ceil(S_native * sample_rate / native_rate)`` samples.
    """
    path = os.fspath(path)
    with _open(path, "audio") as container:
        data, rate = _decode_audio(container, path)
    return _to_mono(data, rate, path, sample_rate)


def decode_audio_bytes(
    data: bytes, name: str, sample_rate: int = SAMPLE_RATE, max_seconds: float | None = None
) -> Tensor:
    """``load_audio`` of a file held in memory (an upload), named ``name`` in errors. With
    ``max_seconds``, a clip whose header declares more is refused before it is decoded (and one
    that decodes to more, after)."""
    if not data:
        raise DataError(f"{name}: empty file (0 bytes)")
    try:
        container = av.open(io.BytesIO(data), **_wav_hint(data[:12]))
    except _DECODE_ERRORS as err:
        raise DataError(f"{name}: not audio PyAV can open ({_reason(err)})") from None
    try:
        if max_seconds is not None and container.streams.audio:
            stream = container.streams.audio[0]
            declared = _seconds(stream.duration, stream.time_base) or (
                container.duration / av.time_base if container.duration else None
            )
            _check_seconds(declared, name, max_seconds)
        samples, rate = _decode_audio(container, name)
    except _DECODE_ERRORS as err:
        raise DataError(f"{name}: cannot decode audio ({_reason(err)})") from None
    finally:
        container.close()
    if max_seconds is not None:
        _check_seconds(samples.shape[1] / rate, name, max_seconds)
    return _to_mono(samples, rate, name, sample_rate)


def _check_seconds(seconds: float | None, name: str, max_seconds: float) -> None:
    if seconds is not None and seconds > max_seconds:
        raise DataError(f"{name}: lasts {seconds:.1f} s, longer than the {max_seconds:g} s allowed")


def _to_mono(data: np.ndarray, rate: int, path: str, sample_rate: int) -> Tensor:
    wav = torch.from_numpy(data)  # (C, S)
    wav = wav[0] if wav.shape[0] == 1 else wav.mean(0)  # (S,)
    if not torch.isfinite(wav).all():
        bad = int((~torch.isfinite(wav)).sum())
        raise DataError(f"{path}: {bad} NaN or infinite audio samples")
    if rate != sample_rate:
        wav = AF.resample(wav, rate, sample_rate)
    if wav.numel() == 0:
        raise DataError(f"{path}: zero-length audio")
    return wav.contiguous()


def _pick_frames(times: np.ndarray, source_fps: float, fps: float) -> np.ndarray:
    """Indices of the source frames shown at each output tick ``i / fps`` (nearest timestamp).

    The clip lasts ``n / source_fps`` seconds, so ``round(n * fps / source_fps)`` frames come
    out (60 frames at 30 fps -> 50 at 25 fps).
    """
    n_out = round(len(times) * fps / source_fps)
    if len(times) == 1:
        return np.zeros(n_out, np.int64)
    ticks = np.arange(n_out) / fps
    right = np.searchsorted(times, ticks).clip(1, len(times) - 1)
    left = right - 1
    nearer_right = np.abs(times[right] - ticks) < np.abs(times[left] - ticks)
    return np.where(nearer_right, right, left)


def load_video(path: str | os.PathLike, fps: float = 25.0) -> Tensor:
    """Decode the first video stream -> ``(T, H, W)`` uint8 grayscale (the luma plane) at ``fps``.

    A file at another frame rate is resampled by picking, for each output tick, the frame
    whose timestamp is nearest (frames are dropped or repeated, never blended).
    """
    path = os.fspath(path)
    with _open(path, "video") as container:
        if not container.streams.video:
            raise DataError(f"{path}: no video stream")
        stream = container.streams.video[0]
        frames, times = [], []
        # one scaler for the clip: ``frame.to_ndarray(format="gray")`` sets up a new one for
        # each frame, 2.6x the time of the conversion itself (the same pixels either way)
        gray = VideoReformatter()
        for frame in container.decode(stream):
            frames.append(gray.reformat(frame, format="gray").to_ndarray())
            times.append(frame.time if frame.time is not None else math.nan)
        rate = stream.average_rate or stream.guessed_rate
    if not frames:
        raise DataError(f"{path}: zero-length video (no frame decoded)")
    video = torch.from_numpy(np.stack(frames))  # (T, H, W)
    source_fps = float(rate) if rate else fps
    if abs(source_fps - fps) < 1e-3 * fps:
        return video
    stamps = np.asarray(times, np.float64)
    if np.isnan(stamps).any():
        stamps = np.arange(len(frames)) / source_fps
    stamps = stamps - stamps[0]
    index = _pick_frames(stamps, source_fps, fps)
    if index.size == 0:
        raise DataError(f"{path}: zero-length video after resampling {source_fps:g} -> {fps:g} fps")
    return video[torch.from_numpy(index)]


def load_image(path: str | os.PathLike) -> Tensor:
    """Decode an image (png, jpeg, ... anything FFmpeg reads) -> ``(3, H, W)`` uint8 RGB."""
    path = os.fspath(path)
    with _open(path, "image") as container:
        if not container.streams.video:
            raise DataError(f"{path}: not an image")
        for frame in container.decode(video=0):
            rgb = frame.to_ndarray(format="rgb24")  # (H, W, 3)
            return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))
    raise DataError(f"{path}: no picture decoded")
