import shutil
import subprocess

import av
import numpy as np
import pytest
import torch
import torchaudio.functional as AF

from mmssl.data.io import decode_audio_bytes, load_audio, load_image, load_video, probe
from mmssl.errors import DataError
from tests.data.media import clicks, moving_frames, write_adts, write_av, write_wav


def _corr(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


@pytest.mark.parametrize("name", ["mp4_h264", "mp4_mpeg4"])
def test_aac_audio_trimmed_to_written_length(media, name):
    wav = load_audio(getattr(media, name))
    assert wav.dtype == torch.float32 and wav.shape == (32000,)  # AAC decodes 32768
    assert _corr(wav, media.audio[0]) > 0.99


def _click_samples(wav: torch.Tensor) -> list[int]:
    return torch.nonzero(wav.abs() > 0.4).flatten().tolist()


def _expected_click_samples(at: list[int], width: int = 8) -> list[int]:
    return [i for start in at for i in range(start, start + width)]


@pytest.mark.parametrize("rate", [16000, 48000])
@pytest.mark.parametrize("timestamps", [True, False], ids=["priming_marked", "priming_unmarked"])
def test_aac_in_mp4_decodes_to_the_written_samples(tmp_path, rate, timestamps):
    """The AAC encoder's 1024 priming samples are gone whether the mp4 marks them (an edit
    list, as ffmpeg writes) or not (PyAV muxing untimed frames): the length is the written one
    and each click lands on its own samples, not 1024 later."""
    at = [rate // 2, 3 * rate // 2]
    path = tmp_path / "clicks.mp4"
    write_av(path, moving_frames(50), clicks(2 * rate, at), sample_rate=rate, audio_timestamps=timestamps)
    wav = load_audio(path, rate)
    assert wav.shape == (2 * rate,)
    assert _click_samples(wav) == _expected_click_samples(at)
    assert probe(path).audio_samples == 2 * rate  # what manifests are filled from


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs the ffmpeg command-line tool")
@pytest.mark.parametrize("rate", [16000, 48000])
def test_aac_written_by_the_ffmpeg_command_decodes_to_the_written_samples(tmp_path, rate):
    at = [rate // 2, 3 * rate // 2]
    source, path = tmp_path / "clicks.wav", tmp_path / "clicks.mp4"
    write_wav(source, clicks(2 * rate, at), rate)
    subprocess.run(
        ["ffmpeg", "-v", "error", "-nostdin", "-i", str(source), "-c:a", "aac", str(path)], check=True
    )
    wav = load_audio(path, rate)
    assert wav.shape == (2 * rate,)
    assert _click_samples(wav) == _expected_click_samples(at)


@pytest.mark.parametrize("rate", [16000, 48000])
def test_adts_aac_keeps_every_sample_in_place(tmp_path, rate):
    """ADTS marks no priming and its duration is an estimate from the bit rate (at 48 kHz,
    1.65 s for 2 s), so nothing is cut at that estimate: at most one frame of encoder padding
    is left at the end."""
    at = [rate // 2, 3 * rate // 2]
    path = tmp_path / "clicks.aac"
    write_adts(path, clicks(2 * rate, at), rate)
    wav = load_audio(path, rate)
    assert 2 * rate <= wav.numel() <= 2 * rate + 1024
    assert _click_samples(wav) == _expected_click_samples(at)


def test_pcm_in_mkv_round_trips_exactly(media):
    wav = load_audio(media.mkv)
    assert wav.shape == (32000,)
    np.testing.assert_allclose(wav.numpy(), media.audio[0], atol=1.0 / 32767)


def test_8k_audio_resampled_to_16k(media):
    wav = load_audio(media.wav8k)
    assert wav.shape == (32000,)
    ref = AF.resample(torch.from_numpy(media.audio8k[0]), 8000, 16000)
    torch.testing.assert_close(wav, ref, atol=1e-3, rtol=0)
    spectrum = torch.fft.rfft(wav).abs()
    assert int(spectrum.argmax()) * 16000 / 32000 == pytest.approx(440, abs=1)


def test_stereo_44k_to_16k_mono(media):
    wav = load_audio(media.wav44)
    assert wav.shape == (32000,)  # ceil(88200 * 16000 / 44100)
    ref = AF.resample(torch.from_numpy(media.audio44.mean(0)), 44100, 16000)
    torch.testing.assert_close(wav, ref, atol=1e-3, rtol=0)


def test_h264_video_frames(media):
    video = load_video(media.mp4_h264)
    assert video.dtype == torch.uint8 and video.shape == (50, 96, 96)
    means = video.float().mean((1, 2))
    np.testing.assert_allclose(means.numpy(), media.frames.reshape(50, -1).mean(1), atol=3)


def test_video_frames_are_ffmpegs_gray_conversion(media):
    """One scaler serves the whole clip: the pixels of PyAV's per-frame gray conversion."""
    with av.open(str(media.mp4_h264)) as container:
        expected = np.stack([f.to_ndarray(format="gray") for f in container.decode(video=0)])
    np.testing.assert_array_equal(load_video(media.mp4_h264).numpy(), expected)


def test_30fps_read_back_at_25fps(media):
    video = load_video(media.mp4_30fps, fps=25.0)
    assert video.shape[0] == 50  # 60 frames / 30 fps = 2 s
    # output tick i (i/25 s) shows the source frame nearest in time: index round(i * 30/25)
    source = media.frames30.reshape(60, -1).mean(1)
    expected = source[[int(np.floor(i * 1.2 + 0.5)) for i in range(50)]]
    np.testing.assert_allclose(video.float().mean((1, 2)).numpy(), expected, atol=3)
    assert load_video(media.mp4_30fps, fps=30.0).shape[0] == 60


def test_probe(media):
    info = probe(media.mp4_30fps)
    assert info.video_fps == 30 and info.video_frames == 60 and (info.width, info.height) == (96, 96)
    assert info.audio_rate == 16000 and info.audio_samples == 32000
    wav = probe(media.wav44)
    assert (wav.audio_rate, wav.audio_channels, wav.audio_samples) == (44100, 2, 88200)
    assert not wav.has_video


def test_image_round_trip(media):
    image = load_image(media.png)
    assert image.shape == (3, 20, 30) and image.dtype == torch.uint8
    np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), media.rgb)


@pytest.mark.parametrize(
    "name, loader, reason",
    [
        ("missing", load_audio, "missing file"),
        ("empty_file", load_audio, "empty file"),
        ("corrupt", load_video, "cannot open"),
        ("truncated", load_audio, "cannot open"),
        ("empty_wav", load_audio, "zero-length audio"),
        ("no_frames", load_video, "zero-length video"),
        ("nan_wav", load_audio, "NaN"),
        ("wav", load_video, "no video stream"),
        ("video_only", load_audio, "no audio stream"),
        ("corrupt", probe, "cannot open"),
    ],
)
def test_bad_media_raise_data_error_naming_file(media, name, loader, reason):
    path = getattr(media, name)
    with pytest.raises(DataError) as err:
        loader(path)
    assert str(err.value).startswith(str(path)) and reason in str(err.value)


_SAMPLE_TYPES = {"s16": np.int16, "s32": np.int32, "u8": np.uint8, "flt": np.float32, "dbl": np.float64}


def _write_pcm(path, data: np.ndarray, codec: str, container_format: str) -> None:
    """``data (C, S)`` in [-1, 1) written with ``codec`` from frames of its own sample format."""
    with av.open(str(path), "w", format=container_format) as container:
        layout = "mono" if data.shape[0] == 1 else "stereo"
        stream = container.add_stream(codec, rate=16000, layout=layout)
        fmt = stream.codec_context.format.name
        base = fmt.rstrip("p")
        if base in ("flt", "dbl"):
            values = data.astype(_SAMPLE_TYPES[base])
        elif base == "u8":
            values = np.clip(np.round(data * 128 + 128), 0, 255).astype(np.uint8)
        else:
            top = {"s16": 2**15, "s32": 2**31}[base]
            values = np.clip(np.round(data * top), -top, top - 1).astype(_SAMPLE_TYPES[base])
        for start in range(0, data.shape[1], 1000):
            part = values[:, start : start + 1000]
            array = part if fmt.endswith("p") else part.T.reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(array), format=fmt, layout=layout)
            frame.sample_rate, frame.pts = 16000, start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def _resampler_decode(path) -> np.ndarray:
    """``(C, S)`` float32 by FFmpeg's own conversion of every frame (swresample to fltp)."""
    with av.open(str(path)) as container:
        to_float = av.AudioResampler(format="fltp")
        chunks = [out.to_ndarray() for frame in container.decode(audio=0) for out in to_float.resample(frame)]
        chunks += [out.to_ndarray() for out in to_float.resample(None)]
    return np.concatenate(chunks, axis=1)


@pytest.mark.parametrize(
    "codec, container_format",
    [
        ("pcm_s16le", "wav"),
        ("pcm_s32le", "wav"),
        ("pcm_u8", "wav"),
        ("pcm_f32le", "wav"),
        ("pcm_f64le", "wav"),
        ("flac", "flac"),
        ("pcm_s16le", "matroska"),
    ],
)
@pytest.mark.parametrize("channels", [1, 2])
def test_samples_equal_ffmpegs_own_float_conversion(tmp_path, codec, container_format, channels):
    """Frames of s16/s32/flt/dbl (packed or planar) are converted to float here, not by
    swresample, and u8 is left to it: the numbers must be FFmpeg's to the bit, from a file and
    from bytes in memory (where a WAVE header also shortens FFmpeg's stream search)."""
    rng = np.random.default_rng(channels)
    data = rng.uniform(-1, 1, (channels, 5003)).astype(np.float32)
    suffix = {"matroska": "mkv"}.get(container_format, container_format)
    path = tmp_path / f"a.{suffix}"
    _write_pcm(path, data, codec, container_format)
    expected = torch.from_numpy(_resampler_decode(path)).mean(0)
    assert expected.numel() == 5003
    loaded = load_audio(path)
    torch.testing.assert_close(loaded, expected, rtol=0, atol=0)
    from_bytes = decode_audio_bytes(path.read_bytes(), "upload", max_seconds=10)
    torch.testing.assert_close(from_bytes, expected, rtol=0, atol=0)
    if channels == 1 and codec.startswith("pcm_s16"):  # and the values written come back
        np.testing.assert_allclose(loaded.numpy(), data[0], atol=1 / 2**15)
