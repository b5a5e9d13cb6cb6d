"""``mmssl serve`` as a command: it listens on the loopback address by default, answers over a
real socket, refuses a 200 MB body from its header, serves from several processes with
``--workers``, and a port in use is a one-line error."""

import json
import os
import socket
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import torch

from mmssl.cli import main
from mmssl.commands.serve import listen
from mmssl.data.manifest import read_manifest
from mmssl.testing import serving


def _multipart(path: Path, k: int = 2) -> tuple[bytes, str]:
    boundary = "mmsslboundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="k"\r\n\r\n{k}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{path.name}"\r\n'
            "Content-Type: audio/wav\r\n\r\n"
        ).encode()
        + path.read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def test_serve_answers_on_loopback_and_refuses_a_200_mb_body_from_its_header(served_index):
    index, manifest = served_index
    record = read_manifest(manifest)[0]
    with serving(index) as url:
        host, port = urlparse(url).hostname, urlparse(url).port
        assert host == "127.0.0.1"
        health = json.load(urllib.request.urlopen(f"{url}/health", timeout=30))
        assert health["index"]["images"] == 4
        body, kind = _multipart(Path(record["audio"]))
        request = urllib.request.Request(f"{url}/search/audio", body, {"Content-Type": kind})
        answer = json.load(urllib.request.urlopen(request, timeout=60))
        assert len(answer["results"]) == 2
        with socket.create_connection((host, port), timeout=30) as raw:  # headers only, no body
            raw.sendall(
                b"POST /search/audio HTTP/1.1\r\nHost: x\r\nContent-Length: 200000000\r\n"
                b"Content-Type: multipart/form-data; boundary=x\r\n\r\n"
            )
            reply = b""
            while b"}" not in reply:  # the JSON error follows the headers, maybe in another packet
                part = raw.recv(4096)
                if not part:
                    break
                reply += part
            reply = reply.decode()
        assert reply.startswith("HTTP/1.1 413") and "upload limit" in reply
        assert json.load(urllib.request.urlopen(f"{url}/health", timeout=30))["status"] == "ok"


def _health(url: str) -> dict:
    return json.load(urllib.request.urlopen(f"{url}/health", timeout=60))


def test_workers_share_the_port_and_each_answers_the_same(served_index):
    index, manifest = served_index
    record = read_manifest(manifest)[0]
    body, kind = _multipart(Path(record["audio"]), k=4)
    with serving(index, "--workers", "2") as url:
        pids: set[int] = set()
        with ThreadPoolExecutor(16) as pool:
            for _ in range(20):  # concurrent requests until both processes have answered
                answers = list(pool.map(_health, [url] * 16))
                assert {a["server"]["workers"] for a in answers} == {2}
                pids |= {a["server"]["pid"] for a in answers}
                if len(pids) == 2:
                    break
            assert len(pids) == 2
            request = urllib.request.Request(f"{url}/search/audio", body, {"Content-Type": kind})
            found = list(pool.map(lambda _: json.load(urllib.request.urlopen(request, timeout=60)), range(8)))
    ranked = [[r["id"] for r in answer["results"]] for answer in found]
    assert len(ranked[0]) == 4 and all(r == ranked[0] for r in ranked)
    # stopped (SIGTERM), the command takes every worker with it: none is left serving, orphaned
    deadline = time.monotonic() + 30
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(pids)


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        alive.add(pid)
    return alive


def _running(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie left for its new parent to reap does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_embedders_answer_and_leave_with_the_server(served_index):
    """``--embedders``: the page's API answers through them, and stopping the server with
    SIGTERM (as systemd, docker or the tests do) ends them too, none left holding a model."""
    index, manifest = served_index
    record = read_manifest(manifest)[0]
    with serving(index, "--embedders", "1", "--quantize", "int8") as url:
        health = json.loads(urllib.request.urlopen(f"{url}/health", timeout=30).read())
        assert health["model"]["linear_layers"] == "int8" and health["embedders"]["processes"] == 1
        pids = health["embedders"]["pids"]
        assert all(_running(p) for p in pids)
        body, content_type = _multipart(Path(record["audio"]), k=1)
        request = urllib.request.Request(f"{url}/search/audio", body, {"Content-Type": content_type})
        answer = json.loads(urllib.request.urlopen(request, timeout=60).read())
        assert answer["results"][0]["id"] == str(record["group"])
    deadline = time.monotonic() + 20
    while any(_running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_running(p) for p in pids)


def test_embedders_and_workers_do_not_combine(served_index, capsys):
    index, _ = served_index
    assert main(["serve", "--index", str(index), "--workers", "2", "--embedders", "1"]) == 2
    assert "--embedders and --workers > 1 do not combine" in capsys.readouterr().err


def test_lanes_share_the_cores_and_a_cpu_takes_at_most_two(monkeypatch):
    from argparse import Namespace

    from mmssl.commands.serve import _lanes

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert _lanes(Namespace(workers=1, threads=None), cpu) == (2, 1)
    assert _lanes(Namespace(workers=2, threads=None), cpu) == (1, 1)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert _lanes(Namespace(workers=1, threads=None), cpu) == (2, 8)
    assert _lanes(Namespace(workers=1, threads=4), cpu) == (4, 4)
    assert _lanes(Namespace(workers=1, threads=None), cuda) == (1, 16)


def test_workers_must_be_positive(served_index, capsys):
    index, _ = served_index
    assert main(["serve", "--index", str(index), "--workers", "0"]) == 2
    assert "--workers and --threads must be positive" in capsys.readouterr().err


def test_a_port_in_use_is_a_one_line_error(served_index, capsys):
    index, _ = served_index
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["serve", "--index", str(index), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--port {port}: cannot listen there" in err[0]


def test_accepted_connections_send_without_waiting_for_acks():
    """Each connection the server accepts has TCP_NODELAY (inherited from the listener, and set
    by asyncio, which does so only for a socket whose proto says TCP): with Nagle's algorithm a
    response's body waited for the client's delayed ACK of its headers, 40 ms a request."""
    with listen("127.0.0.1", 0) as sock, socket.create_connection(sock.getsockname()[:2]):
        accepted, _ = sock.accept()
        with accepted:
            assert accepted.proto == socket.IPPROTO_TCP
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_a_missing_index_is_a_one_line_error(tmp_path, capsys):
    assert main(["serve", "--index", str(tmp_path / "none")]) == 2
    assert "no such index folder" in capsys.readouterr().err
