"""Small media files shared by the data tests, written once per session with PyAV."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from tests.data.media import moving_frames, tone, write_av, write_image, write_wav

SR = 16000


@pytest.fixture(scope="session")
def media(tmp_path_factory):
    """Paths to a small set of clips (2 s unless named otherwise) and what was encoded."""
    d = tmp_path_factory.mktemp("media")
    m = SimpleNamespace(dir=d)
    m.audio = tone(2 * SR)  # (1, 32000)
    m.frames = moving_frames(50)  # (50, 96, 96): 2 s at 25 fps
    m.mp4_h264 = d / "h264_aac.mp4"
    write_av(m.mp4_h264, m.frames, m.audio, video_codec="libx264")
    m.mp4_mpeg4 = d / "mpeg4_aac.mp4"
    write_av(m.mp4_mpeg4, m.frames, m.audio, video_codec="mpeg4")
    m.mp4_unmarked = d / "h264_aac_unmarked.mp4"  # audio frames without pts: no edit list
    write_av(m.mp4_unmarked, m.frames, m.audio, video_codec="libx264", audio_timestamps=False)
    m.mp4_unmarked48 = d / "h264_aac48k_unmarked.mp4"
    write_av(m.mp4_unmarked48, m.frames, tone(2 * 48000, 48000), sample_rate=48000, audio_timestamps=False)
    m.mkv = d / "mpeg4_pcm.mkv"
    write_av(m.mkv, m.frames, m.audio, video_codec="mpeg4", audio_codec="pcm_s16le")
    m.frames30 = moving_frames(60)
    m.mp4_30fps = d / "30fps.mp4"
    write_av(m.mp4_30fps, m.frames30, m.audio, fps=30, video_codec="mpeg4")
    m.video_only = d / "video_only.mp4"
    write_av(m.video_only, m.frames, None, video_codec="mpeg4")
    m.short_video = d / "short_video.mkv"  # 1.6 s of video, 2 s of audio
    write_av(m.short_video, m.frames[:40], m.audio, video_codec="mpeg4", audio_codec="pcm_s16le")
    m.no_frames = d / "no_frames.mkv"  # a video stream without a single frame
    write_av(m.no_frames, m.frames[:0], m.audio, video_codec="mpeg4", audio_codec="pcm_s16le")
    m.wav = d / "mono16k.wav"
    write_wav(m.wav, m.audio)
    m.wav8k = d / "mono8k.wav"
    m.audio8k = write_wav(m.wav8k, tone(2 * 8000, 8000), 8000)
    m.wav44 = d / "stereo44k.wav"
    m.audio44 = write_wav(m.wav44, tone(2 * 44100, 44100, channels=2), 44100)
    m.silent = d / "silent.wav"
    write_wav(m.silent, np.zeros((1, SR), np.float32))
    m.empty_wav = d / "zero_length.wav"
    write_wav(m.empty_wav, np.zeros((1, 0), np.float32))
    nan = tone(SR)
    nan[0, 100:110] = np.nan
    m.nan_wav = d / "nan.wav"
    write_wav(m.nan_wav, nan, codec="pcm_f32le")
    m.corrupt = d / "corrupt.mp4"
    m.corrupt.write_bytes(np.random.default_rng(0).bytes(4000))
    m.truncated = d / "truncated.mp4"
    m.truncated.write_bytes(m.mp4_h264.read_bytes()[:3000])
    m.truncated_mkv = d / "truncated.mkv"  # opens (header first) but stops early
    data = m.mkv.read_bytes()
    m.truncated_mkv.write_bytes(data[: len(data) * 2 // 5])
    m.empty_file = d / "empty.wav"
    m.empty_file.write_bytes(b"")
    m.missing = d / "missing.wav"
    m.rgb = np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    m.png = d / "image.png"
    write_image(m.png, m.rgb)
    return m
