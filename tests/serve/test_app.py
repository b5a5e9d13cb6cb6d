"""``mmssl serve``'s API in-process (FastAPI's TestClient): answers, files by id, and every bad
request a 4xx JSON error naming the problem, after which the server still answers."""

import os
import re
import signal
import threading
import time
import wave
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from mmssl.cli import main
from mmssl.data.io import load_audio
from mmssl.data.manifest import read_manifest
from mmssl.errors import ConfigError, DataError
from mmssl.serve.app import create_app
from mmssl.serve.search import open_service
from mmssl.testing import save_tiny_run
from tests.data.media import _audio_stream, _encode_audio, write_wav

MAX_MB, MAX_SECONDS = 8.0, 10.0


@pytest.fixture(scope="module")
def client(served_index):
    index, _ = served_index
    service = open_service(index, torch.device("cpu"))
    with TestClient(create_app(service, MAX_MB, MAX_SECONDS, max_k=20), raise_server_exceptions=False) as c:
        yield c


def _encoded(path: Path, data: np.ndarray, rate: int, fmt: str, codec: str) -> bytes:
    """``data (C, S)`` at ``rate`` written as ``fmt`` with ``codec``; the file's bytes."""
    with av.open(str(path), "w", format=fmt) as container:
        stream = _audio_stream(container, data.shape[0], rate, codec)
        if codec == "libmp3lame":
            stream.format = "fltp"  # its default (s32p) is not one the helper writes
        _encode_audio(container, stream, data.astype(np.float32))
    return path.read_bytes()


def _search(client, data: bytes, name: str = "q.wav", k: int | str = 3, field: str = "file"):
    files = {field: (name, data, "application/octet-stream")}
    return client.post("/search/audio", files=files, data={"k": k})


def _error(response, status: int, *named: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and "Traceback" not in body["error"], body
    for text in named:
        assert text in body["error"], (text, body["error"])
    return body["error"]


def test_health_names_the_model_and_the_index(client):
    info = client.get("/health").json()
    assert info["status"] == "ok"
    assert info["index"]["images"] == 4 and info["index"]["captions"] == 8
    assert info["index"]["search"] == "exact" and info["model"]["text_queries"] is False
    assert info["limits"] == {"max_upload_mb": MAX_MB, "max_seconds": MAX_SECONDS, "max_k": 20}


def test_spoken_captions_find_their_own_image(client, served_index):
    _, manifest = served_index
    records = read_manifest(manifest)
    hits = 0
    for record in records:
        answer = _search(client, Path(record["audio"]).read_bytes(), Path(record["audio"]).name, 4)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        scores = [r["score"] for r in body["results"]]
        assert len(scores) == 4 and scores == sorted(scores, reverse=True)
        assert [r["rank"] for r in body["results"]] == [1, 2, 3, 4]
        assert body["query"]["name"] == Path(record["audio"]).name
        assert set(body["timing_ms"]) == {"decode", "embed", "search", "total"}
        hits += body["results"][0]["id"] == record["group"]
    assert hits >= 6, hits  # the run memorised these captions (as tests/eval/test_query.py)


def test_items_are_the_indexed_images_and_caption_audio(client, served_index):
    _, manifest = served_index
    record = read_manifest(manifest)[0]
    top = _search(client, Path(record["audio"]).read_bytes(), k=1).json()["results"][0]
    image = client.get(top["image"])
    assert image.status_code == 200 and image.headers["content-type"].startswith("image/")
    row = next(r for r in read_manifest(manifest) if r["group"] == top["id"])
    assert image.content == Path(row["image"]).read_bytes()
    caption = top["captions"][0]
    audio = client.get(caption["audio"])
    assert audio.status_code == 200 and audio.headers["content-type"].startswith("audio/")
    assert caption["text"] and audio.content[:4] == b"RIFF"


def test_any_format_rate_and_channels_pyav_decodes(client, served_index, tmp_path):
    _, manifest = served_index
    record = read_manifest(manifest)[2]
    speech = load_audio(record["audio"]).numpy()
    wav = _search(client, Path(record["audio"]).read_bytes(), k=4).json()["results"]
    stereo = np.stack([speech, speech])
    stereo_48k = np.stack([np.interp(np.arange(3 * len(speech)) / 3, np.arange(len(speech)), speech)] * 2)
    for fmt, codec, rate, data in (
        ("flac", "flac", 16000, stereo),
        ("ogg", "libopus", 48000, stereo_48k),
        ("mp3", "libmp3lame", 48000, stereo_48k),
        ("webm", "libopus", 48000, stereo_48k),  # what a browser's MediaRecorder sends
        ("wav", "pcm_f32le", 16000, speech[None]),
    ):
        body = _encoded(tmp_path / f"q.{fmt}", data, rate, fmt, codec)
        answer = _search(client, body, f"q.{fmt}", 4)
        assert answer.status_code == 200, (fmt, answer.text)
        assert answer.json()["results"][0]["id"] == wav[0]["id"], fmt


@pytest.mark.parametrize(
    "name, data, status, named",
    [
        ("notes.txt", b"this is not audio at all, just words\n" * 20, 422, ["notes.txt", "not audio"]),
        ("empty.wav", b"", 422, ["empty.wav", "empty"]),
        ("image.png", b"\x89PNG\r\n\x1a\n" + bytes(200), 422, ["image.png"]),
    ],
)
def test_uploads_that_are_not_audio(client, name, data, status, named):
    _error(_search(client, data, name), status, *named)


def test_a_truncated_or_too_long_or_too_short_clip(client, tmp_path):
    whole = tmp_path / "whole.wav"
    write_wav(whole, 0.3 * np.sin(np.arange(16000) / 5.0))
    _error(_search(client, whole.read_bytes()[:30], "cut.wav"), 422, "cut.wav")  # the header cut
    long = tmp_path / "long.wav"
    with wave.open(str(long), "wb") as w:  # 10 minutes of 8-bit 8 kHz audio (4.8 MB)
        w.setnchannels(1), w.setsampwidth(1), w.setframerate(8000)
        w.writeframes(bytes([128]) * (8000 * 60 * 10))
    _error(_search(client, long.read_bytes(), "long.wav"), 422, "long.wav", "lasts 600.0 s", "10 s allowed")
    tiny = tmp_path / "tiny.wav"
    write_wav(tiny, 0.3 * np.ones(10))
    _error(_search(client, tiny.read_bytes(), "tiny.wav"), 422, "tiny.wav", "too short")


def test_a_body_over_the_upload_limit_is_refused_before_it_is_read(client):
    big = bytes(int(3 * MAX_MB * 1e6))
    _error(_search(client, big, "big.wav"), 413, "upload limit")

    def chunks():  # no Content-Length: refused once the limit is passed
        yield b'--x\r\nContent-Disposition: form-data; name="file"; filename="big.wav"\r\n\r\n'
        for _ in range(int(3 * MAX_MB * 10)):
            yield bytes(100_000)

    answer = client.post(
        "/search/audio", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"}
    )
    _error(answer, 413, "upload limit")


def test_wrong_fields_and_values(client, served_index):
    _, manifest = served_index
    speech = Path(read_manifest(manifest)[0]["audio"]).read_bytes()
    _error(_search(client, speech, field="audio"), 422, "'file'", "audio")
    _error(client.post("/search/audio", data={"k": 3}), 422, "'file'")
    _error(client.post("/search/audio", content=b"x", headers={"content-type": "text/plain"}), 422, "file")
    _error(_search(client, speech, k="many"), 422, "k")
    _error(_search(client, speech, k=0), 422, "k must be between 1 and 20")
    _error(_search(client, speech, k=21), 422, "k must be between 1 and 20")
    broken = client.post(
        "/search/audio",
        content=b"--x\r\nContent-Disposition: form-data; name=file; filename=a.wav\r\n\r\nabc",
        headers={"content-type": "multipart/form-data; boundary=x"},
    )
    assert 400 <= broken.status_code < 500 and "error" in broken.json()


def test_text_search_without_a_text_tower_says_so(client):
    _error(client.post("/search/text", json={"text": "a red circle"}), 404, "caption_weight")
    _error(client.post("/search/text", json={"txt": "a red circle"}), 422, "text")
    as_json = {"content-type": "application/json"}
    _error(client.post("/search/text", content=b"{not json", headers=as_json), 422)
    _error(client.post("/search/text", json={"text": ""}), 422, "text")


@pytest.mark.parametrize(
    "path",
    ["/items/nope", "/items/../index.json", "/items/..%2Findex.json", "/items/%2Fetc%2Fpasswd", "/items/"],
)
def test_unknown_ids_and_paths_are_404_and_no_file_outside_the_index_list(client, path):
    answer = client.get(path)
    assert answer.status_code == 404, (path, answer.text)
    assert "error" in answer.json()
    assert b"images.safetensors" not in answer.content and b"root:" not in answer.content


def test_the_server_keeps_serving_after_bad_requests_and_documents_its_api(client, served_index):
    _, manifest = served_index
    for _ in range(3):
        _search(client, b"garbage", "x.mp3")
    assert client.get("/health").status_code == 200
    record = read_manifest(manifest)[1]
    assert _search(client, Path(record["audio"]).read_bytes()).status_code == 200
    schema = client.get("/openapi.json").json()
    assert {"/search/audio", "/search/text", "/items/{item_id}", "/health"} <= set(schema["paths"])
    docs = client.get("/docs")  # Swagger UI from files the server ships, nothing from a CDN
    assert docs.status_code == 200 and "/openapi.json" in docs.text
    assets = re.findall(r'(?:src|href)="([^"]+\.(?:js|css))"', docs.text)
    assert len(assets) == 2 and all(url.startswith("/") for url in assets), assets
    assert all(client.get(url).status_code == 200 and len(client.get(url).content) > 10_000 for url in assets)
    page = client.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    assert "http" not in page.text.replace("http-equiv", "")  # nothing from another host
    script = client.get("/static/app.js")
    assert script.status_code == 200 and "/search/audio" in script.text and "https://" not in script.text


def test_silent_queries_answer_with_a_warning(client, tmp_path):
    silent = tmp_path / "silent.wav"
    write_wav(silent, np.zeros(16000, np.float32))
    answer = _search(client, silent.read_bytes(), "silent.wav")
    assert answer.status_code == 200
    assert any("silent" in w for w in answer.json()["warnings"])


def test_text_queries_with_a_text_tower(served_index, tmp_path):
    _, manifest = served_index
    _, step = save_tiny_run(tmp_path / "run", "speech_image", manifest, ("objective.caption_weight=1.0",))
    index = tmp_path / "index"
    argv = ["index", "--run", str(step / "model.safetensors"), "--manifest", str(manifest), "--quiet"]
    assert main([*argv, "--out", str(index)]) == 0
    service = open_service(index, torch.device("cpu"))
    with TestClient(create_app(service)) as c:
        assert c.get("/health").json()["model"]["text_queries"] is True
        answer = c.post("/search/text", json={"text": "a red circle", "k": 2})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert len(body["results"]) == 2 and body["query"] == {"text": "a red circle"}


def test_queries_waiting_together_are_embedded_as_one_batch_with_the_same_answers(served_index):
    index, manifest = served_index
    service = open_service(index, torch.device("cpu"))
    waves = [load_audio(r["audio"]) for r in read_manifest(manifest)[:4]] + [torch.full((10,), 0.3)]
    alone = [service.embed_audio(w, f"q{i}", []) for i, w in enumerate(waves[:4])]
    results: dict = {}

    def ask(i):
        try:
            results[i] = service.embed_audio(waves[i], f"q{i}", [])
        except Exception as err:  # the test looks at which error
            results[i] = err

    batches = []
    real = service._embed_batch
    service._embed_batch = lambda batch: (batches.append(len(batch)), real(batch))[1]
    with service.lane:  # the model is busy (one lane): every query waits
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(5)]
        for t in threads:
            t.start()
        while len(service.waiting) < 5:
            time.sleep(0.01)
    for t in threads:
        t.join(timeout=60)
    assert batches[0] == 5  # one batch for all five, then the short clip alone to name it
    for i in range(4):
        torch.testing.assert_close(results[i], alone[i], atol=1e-5, rtol=1e-4)
    assert isinstance(results[4], DataError) and "q4" in str(results[4]) and "too short" in str(results[4])
    assert not service.waiting


def test_two_lanes_embed_two_queries_at_the_same_time_with_the_same_answers(served_index):
    index, manifest = served_index
    service = open_service(index, torch.device("cpu"), max_batch=1, lanes=2)
    waves = [load_audio(r["audio"]) for r in read_manifest(manifest)[:2]]
    alone = [service.embed_audio(w, f"q{i}", []) for i, w in enumerate(waves)]
    both_in = threading.Barrier(2, timeout=60)  # passed only when two model calls run at once
    real = service._embed_batch
    service._embed_batch = lambda batch: (both_in.wait(), real(batch))[1]
    results: dict = {}

    def ask(i):
        try:
            results[i] = service.embed_audio(waves[i], f"q{i}", [])
        except Exception as err:  # a broken barrier: one lane only
            results[i] = err

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for i in range(2):
        assert isinstance(results[i], torch.Tensor), results[i]
        torch.testing.assert_close(results[i], alone[i], atol=1e-5, rtol=1e-4)
    assert not service.waiting


def test_int8_linear_layers_keep_the_embeddings_and_the_answers(served_index):
    index, manifest = served_index
    exact = open_service(index, torch.device("cpu"))
    int8 = open_service(index, torch.device("cpu"), quantize="int8")
    linear = [m for m in int8.objective.modules() if type(m) is torch.nn.Linear]
    assert not linear and int8.describe()["model"]["linear_layers"] == "int8"
    assert any(type(m) is torch.nn.Linear for m in exact.objective.modules())  # its own copy
    for record in read_manifest(manifest):
        wave = load_audio(record["audio"])
        a, b = exact.embed_audio(wave, "q", []), int8.embed_audio(wave, "q", [])
        assert float((a * b).sum()) > 0.999  # both unit vectors
        assert exact.top(a, 1)[0][0]["id"] == int8.top(b, 1)[0][0]["id"]
    with pytest.raises(ConfigError, match="CPU only"):
        open_service(index, torch.device("meta"), quantize="int8")


def test_embedder_processes_give_the_same_embeddings_and_name_a_clip_too_short(served_index):
    index, manifest = served_index
    here = open_service(index, torch.device("cpu"))
    service = open_service(index, torch.device("cpu"), max_batch=1, embedders=2)  # as on a CPU
    try:
        pids = service.describe()["embedders"]["pids"]
        assert len(set(pids)) == 2 and os.getpid() not in pids
        waves = [load_audio(r["audio"]) for r in read_manifest(manifest)[:3]]
        for i, wave in enumerate(waves):
            torch.testing.assert_close(
                service.embed_audio(wave, f"q{i}", []),
                here.embed_audio(wave, f"q{i}", []),
                atol=1e-5,
                rtol=1e-4,
            )
        with pytest.raises(DataError, match="short.wav.*too short"):
            service.embed_audio(torch.full((10,), 0.3), "short.wav", [])
        with TestClient(create_app(service)) as c:  # the page's path: upload -> answer
            record = read_manifest(manifest)[0]
            with open(record["audio"], "rb") as f:
                answer = c.post("/search/audio", files={"file": ("q.wav", f, "audio/wav")}, data={"k": "1"})
            assert answer.status_code == 200, answer.text
            assert (
                answer.json()["results"][0]["id"]
                == here.top(here.embed_audio(waves[0], "q", []), 1)[0][0]["id"]
            )
            health = c.get("/health").json()["embedders"]
            assert health == {"processes": 2, "pids": pids, "restarts": 0, "in_flight": 4}
        # each embedder is handed its next query while it embeds one: 4 queries reach the pool
        # at once (the barrier breaks, and the queries fail, unless they do)
        together, handed = threading.Barrier(4, timeout=30), service.embedders.embed
        service.embedders.embed = lambda w, n: (together.wait(), handed(w, n))[1]
        answers: dict[int, torch.Tensor] = {}

        def ask(i: int) -> None:
            answers[i] = service.embed_audio(waves[i % 3], f"q{i}", [])

        askers = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for t in askers:
            t.start()
        for t in askers:
            t.join()
        del service.embedders.embed
        for i in range(4):
            torch.testing.assert_close(answers[i], here.embed_audio(waves[i % 3], "q", []))
        # an embedder killed (the OOM killer, a crash): every query is still answered, and the
        # pool, broken once its manager sees the death, is started again
        os.kill(pids[0], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while service.describe()["embedders"]["restarts"] == 0 and time.monotonic() < deadline:
            torch.testing.assert_close(
                service.embed_audio(waves[1], "q", []), here.embed_audio(waves[1], "q", [])
            )
            time.sleep(0.1)
        after = service.describe()["embedders"]
        assert after["restarts"] == 1 and len(after["pids"]) == 2 and not set(after["pids"]) & set(pids)
        torch.testing.assert_close(
            service.embed_audio(waves[2], "q", []), here.embed_audio(waves[2], "q", [])
        )
    finally:
        service.embedders.close()
