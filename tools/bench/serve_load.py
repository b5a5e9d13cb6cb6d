"""A bounded loopback load test of ``mmssl serve``: ``--clients`` concurrent clients for
``--seconds`` (at most ``--max-requests`` in all), each posting spoken captions to
``/search/audio`` over a keep-alive connection, and every ``--bad-every``-th request a file that
is not audio (which must get a 422, never a 5xx). Reports latency p50/p95/p99 of the good
requests, requests/s, the server's own split (decode, embed, search) and every error.

The index: the built-in tiny corpus's images, indexed with an untrained ``speech_image`` run
of ``--size`` (latency does not depend on training), grown to ``--images`` rows with synthetic
unit embeddings that cycle through the real images (``--faiss`` picks the search kind).
Traffic goes to 127.0.0.1 only, and the test stops by itself.

    python tools/bench/serve_load.py --work /tmp/load --images 10000 --clients 20 --seconds 30
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `mmssl serve` (mmssl.cli.ENVIRONMENT)

import argparse  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402
from urllib.parse import urlparse  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from mmssl.cli import main as mmssl  # noqa: E402
from mmssl.data.io import probe  # noqa: E402
from mmssl.data.manifest import read_manifest  # noqa: E402
from mmssl.data.synth import config_for, generate  # noqa: E402
from mmssl.eval.search import FAISS_FILE, build_faiss, write_faiss  # noqa: E402
from mmssl.files import sha256_file  # noqa: E402
from mmssl.runs import CHECKPOINTS, MODEL_FILE, step_dir_name  # noqa: E402
from mmssl.testing import save_tiny_run, serving  # noqa: E402

BOUNDARY = "mmsslloadtest"


def build_index(
    work: Path, size: str, images: int, faiss_kind: str, corpus: Path | None = None
) -> tuple[Path, list[Path]]:
    """``(index folder, caption wavs)`` in ``work`` (made once, reused)."""
    corpus = corpus or work / "corpus"
    if not (corpus / "image" / "train.jsonl").is_file():
        generate(config_for("tiny"), corpus, workers=1, progress=False)
    manifest = corpus / "image" / "train.jsonl"
    records = read_manifest(manifest)
    run = work / f"run_{size}"
    if not run.is_dir():
        save_tiny_run(run, "speech_image", manifest, (f"model.size={size}", "objective.speech=fbank"))
    base = work / f"index_{size}"
    if not (base / "index.json").is_file():
        weights = run / CHECKPOINTS / step_dir_name(1) / MODEL_FILE  # as save_tiny_run saves it
        argv = ["index", "--run", str(weights), "--manifest", str(manifest), "--out", str(base), "--quiet"]
        assert mmssl(argv) == 0
    index = work / f"index_{size}_{images}_{faiss_kind}"
    if not (index / "index.json").is_file():
        grow(base, index, images, faiss_kind)
    return index, [Path(r["audio"]) for r in records]


def grow(base: Path, out: Path, images: int, faiss_kind: str) -> None:
    """A copy of index ``base`` with ``images`` rows: its own, then synthetic unit vectors."""
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(base, out)
    real = load_file(str(base / "images.safetensors"))["embeddings"]
    rows = [json.loads(line) for line in (base / "images.jsonl").read_text().splitlines()]
    extra = torch.nn.functional.normalize(torch.randn(images - len(rows), real.shape[1]), dim=1)
    embeddings = torch.cat([real, extra]).contiguous()
    rows += [{**rows[i % len(rows)], "group": f"synthetic{i:07d}", "captions": []} for i in range(len(extra))]
    save_file({"embeddings": embeddings}, str(out / "images.safetensors"))
    (out / "images.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    meta = json.loads((out / "index.json").read_text())
    meta["images"] = images
    meta["search"] = {"kind": faiss_kind}
    if faiss_kind != "exact":
        write_faiss(build_faiss(embeddings, faiss_kind), out / FAISS_FILE)
    meta["files"] = {
        p.name: sha256_file(p)
        for p in sorted(out.iterdir())
        if p.suffix in (".safetensors", ".jsonl", ".faiss")
    }
    (out / "index.json").write_text(json.dumps(meta, indent=2))


def multipart(name: str, data: bytes, k: int) -> bytes:
    return (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="k"\r\n\r\n{k}\r\n'
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


def connect(host: str, port: int) -> http.client.HTTPConnection:
    """A keep-alive connection that sends each request at once, as browsers and curl do
    (TCP_NODELAY): ``http.client`` writes the headers and the body in two sends, and with Nagle's
    algorithm on, the body waits for the server's delayed ACK of the headers (about 40 ms on
    Linux), which would be counted as the server's latency."""
    conn = http.client.HTTPConnection(host, port, timeout=60)
    conn.connect()
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def client(
    url: str, bodies: list[bytes], bad: bytes, args, deadline: float, budget, out: list, seed: int
) -> None:
    parsed = urlparse(url)
    conn = connect(parsed.hostname, parsed.port)
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    n = seed
    while time.monotonic() < deadline and next(budget, None) is not None:
        n += 1
        is_bad = args.bad_every > 0 and n % args.bad_every == 0
        body = bad if is_bad else bodies[n % len(bodies)]
        start = time.perf_counter()
        try:
            conn.request("POST", "/search/audio", body, headers)
            response = conn.getresponse()
            payload = response.read()
            status = response.status
        except (OSError, http.client.HTTPException) as err:
            conn.close()
            conn = connect(parsed.hostname, parsed.port)
            out.append(
                (
                    "bad" if is_bad else "good",
                    f"connection: {type(err).__name__}",
                    time.perf_counter() - start,
                    None,
                )
            )
            continue
        elapsed = time.perf_counter() - start
        timing = json.loads(payload).get("timing_ms") if status == 200 else None
        out.append(("bad" if is_bad else "good", status, elapsed, timing))
    conn.close()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", default="/tmp/mmssl_load")
    parser.add_argument(
        "--corpus", help="a `mmssl synth --size tiny` folder to use (default: made in --work)"
    )
    parser.add_argument("--size", default="small", help="model.size of the speech_image run (default small)")
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--faiss", default="exact", help="exact | hnsw | ivf")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--max-requests", type=int, default=20_000)
    parser.add_argument("--bad-every", type=int, default=10, help="every Nth request is not audio (0: none)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--max-batch", type=int, default=1, help="mmssl serve --max-batch (default 1)")
    parser.add_argument("--workers", type=int, default=1, help="mmssl serve --workers (default 1)")
    parser.add_argument("--threads", type=int, help="mmssl serve --threads (default: its own)")
    parser.add_argument("--quantize", default="none", help="mmssl serve --quantize (none | int8)")
    parser.add_argument("--embedders", type=int, default=0, help="mmssl serve --embedders (default 0)")
    parser.add_argument("--out", help="append the summary as one JSON line here")
    args = parser.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    corpus = Path(args.corpus) if args.corpus else None
    index, wavs = build_index(work, args.size, args.images, args.faiss, corpus)
    bodies = [multipart(w.name, w.read_bytes(), args.k) for w in wavs[:20]]
    bad = multipart("notes.txt", b"this is not audio\n" * 50, args.k)
    seconds = [probe(w).audio_duration or 0.0 for w in wavs[:20]]
    options = ["--max-batch", str(args.max_batch), "--workers", str(args.workers)]
    options += ["--threads", str(args.threads)] if args.threads else []
    options += ["--quantize", args.quantize, "--embedders", str(args.embedders)]
    with serving(index, *options) as url:
        for body in bodies[:3]:  # warm-up, not counted
            client(
                url,
                [body],
                bad,
                argparse.Namespace(bad_every=0),
                time.monotonic() + 30,
                iter(range(1)),
                [],
                0,
            )
        results: list = []
        budget = iter(range(args.max_requests))  # shared: next() on a range iterator is atomic in CPython
        deadline = time.monotonic() + args.seconds
        threads = [
            threading.Thread(target=client, args=(url, bodies, bad, args, deadline, budget, results, i))
            for i in range(args.clients)
        ]
        start, cpu = time.monotonic(), time.process_time()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall, client_cpu = time.monotonic() - start, time.process_time() - cpu
    good = [r for r in results if r[0] == "good"]
    ok = [r for r in good if r[1] == 200]
    statuses = Counter(f"{kind} {status}" for kind, status, _, _ in results)
    errors = sum(n for key, n in statuses.items() if key not in ("good 200", "bad 422"))
    ms = 1000 * np.array([r[2] for r in ok])
    split = {key: round(float(np.mean([r[3][key] for r in ok])), 2) for key in ("decode", "embed", "search")}
    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "model_size": args.size,
        "images": args.images,
        "search": args.faiss,
        "clients": args.clients,
        "max_batch": args.max_batch,
        "workers": args.workers,
        "threads": args.threads,
        "quantize": args.quantize,
        "embedders": args.embedders,
        "seconds": round(wall, 1),
        "requests": len(results),
        "requests_per_s": round(len(results) / wall, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p95_ms": round(float(np.percentile(ms, 95)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
        "server_mean_ms": split,
        # CPU time of this process (the clients) per request: what the load generator takes
        # from the cores the server runs on
        "client_cpu_ms_per_request": round(1000 * client_cpu / max(len(results), 1), 2),
        "query_seconds_mean": round(float(np.mean(seconds)), 2),
        "statuses": dict(statuses),
        "errors": errors,
    }
    print(json.dumps(summary, indent=2))
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(json.dumps(summary) + "\n")
    return summary


if __name__ == "__main__":
    main()
