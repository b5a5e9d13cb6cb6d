"""``mmssl serve``: a speech-image search service over an index (``mmssl index``).

    mmssl serve --index INDEX_DIR [--host 127.0.0.1] [--port 8080] [--max-upload-mb 20]
                [--max-seconds 60] [--max-k 100] [--max-batch N] [--checkpoint RUN_OR_CKPT]
                [--device auto|cpu|cuda] [--workers N] [--threads N] [--embedders N]
                [--quantize int8]

Loads the index and the run that made it once, then answers over HTTP until interrupted: the
API and page of ``mmssl.serve.app`` (search by speech upload or recording, or by text when the
run has a text tower; the indexed images and caption audio by id; ``/health``; ``/docs``).
Binds the loopback address unless ``--host`` says otherwise; ``--port 0`` takes a free port
(printed). A port in use, a missing or mixed index, or a run that cannot be loaded are one-line
errors before anything listens.

``--workers N`` serves from N processes that share the listening socket (the pre-fork model of
gunicorn and of uvicorn's own ``--workers``), each with its own copy of the model and the index
and its share of the cores: a query that embeds audio holds one process, so the others keep
answering. The address is printed once every worker has loaded; a worker that cannot load is
a one-line error, and stopping the command stops them all.

``--threads N``: queries each process embeds at once (``mmssl.serve.search``), each on
``cores / (workers x N)`` torch threads. Default on a CPU: one per core of the process, at most
2, each on its share of the cores (lanes share the process's queue, so unlike workers no query
waits behind another while a core is free); on a GPU: 1.

``--embedders N`` (a CPU only, one server process): N processes embed the spoken queries, one
torch thread each, fed from one queue (oldest first, each with its next query queued), while
the server process keeps HTTP, decoding and image search
(``mmssl.serve.embedders``): the busiest setting on a small CPU, since no client is tied to a
busy process and the model runs outside the server's GIL.

``--quantize int8`` (a CPU only): the model's linear layers in int8, quantized dynamically at
start-up (``mmssl.serve.quantize``): cheaper queries, embeddings within a cosine of
0.999 of the float ones the index holds.
"""

from __future__ import annotations

import argparse
import ipaddress
import multiprocessing as mp
import os
import queue
import socket
import sys

from mmssl.devices import pick_device
from mmssl.errors import ConfigError
from mmssl.serve.lifetime import watch_parent


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", required=True, help="index folder written by `mmssl index`")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port (default 8080; 0: any free one)")
    parser.add_argument(
        "--max-upload-mb", type=float, default=20.0, help="largest request body, MB (default 20)"
    )
    parser.add_argument(
        "--max-seconds", type=float, default=60.0, help="longest spoken query, seconds (default 60)"
    )
    parser.add_argument("--max-k", type=int, default=100, help="most images per answer (default 100)")
    parser.add_argument(
        "--max-batch",
        type=int,
        help="spoken queries waiting together embedded as one batch (default: 8 on a GPU, 1 on a CPU, "
        "where batching measured no faster: BENCHMARKS.md)",
    )
    parser.add_argument(
        "--checkpoint", help="embed queries with this run or checkpoint instead of the index's"
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes sharing the port, each with its own model and cores / N threads (default 1)",
    )
    parser.add_argument(
        "--embedders",
        type=int,
        default=0,
        help="processes that embed spoken queries, fed from one queue, one torch thread each, N "
        "queries at once (a CPU, one server process; default 0: the server process embeds them)",
    )
    parser.add_argument(
        "--quantize",
        choices=["none", "int8"],
        default="none",
        help="int8: the model's linear layers quantized to int8 for cheaper queries on a CPU (default none)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="queries each process embeds at once, each on cores / (workers x N) torch threads "
        "(default: a CPU's cores / workers, at most 2; 1 on a GPU)",
    )


def check_limits(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be between 0 and 65535; got {args.port}")
    if not (
        args.max_upload_mb > 0
        and args.max_seconds > 0
        and args.max_k >= 1
        and (args.max_batch is None or args.max_batch >= 1)
        and args.workers >= 1
        and (args.threads is None or args.threads >= 1)
        and args.embedders >= 0
    ):
        raise ConfigError(
            "--max-upload-mb, --max-seconds, --max-k, --max-batch, --workers and --threads must be "
            "positive, --embedders 0 or more"
        )
    if args.embedders and args.workers > 1:
        raise ConfigError(
            "--embedders and --workers > 1 do not combine: use --embedders alone, one server "
            "process feeds them all (worker processes are daemons, which cannot start processes)"
        )


def listen(host: str, port: int) -> socket.socket:
    """A bound socket, or a ``ConfigError`` naming the address (in use, not this machine's)."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        family = socket.AF_INET  # a host name
    # IPPROTO_TCP named, not left 0: asyncio sets TCP_NODELAY only on sockets whose proto says
    # TCP, and without it a response's body waits for the client's delayed ACK of its headers
    # (about 40 ms a request on Linux); set on the listener too, which accepted sockets inherit
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ConfigError(
            f"--host {host} --port {port}: cannot listen there ({err.strerror or err})"
        ) from None
    sock.listen(128)
    return sock


# default lanes of a process on a CPU: at most this many (measured on 2 cores, where one lane of
# one torch thread per core answered most; on a larger CPU each lane keeps several threads, so
# one query alone is not left to a single core)
MAX_CPU_LANES = 2


def _lanes(args: argparse.Namespace, device) -> tuple[int, int]:
    """``(queries embedded at once, torch threads)`` in each of ``args.workers`` processes: the
    cores shared among the workers, then among the lanes of each."""
    cores = max(1, (os.cpu_count() or 1) // args.workers)
    lanes = args.threads or (1 if device.type == "cuda" else min(cores, MAX_CPU_LANES))
    return lanes, max(1, cores // lanes)


def _app(args: argparse.Namespace):
    """The service and its FastAPI application, as ``args`` ask (in each worker, with its share
    of the cores when there are several)."""
    import torch  # lazy: torch and the run only after the checks

    from mmssl.serve.app import create_app  # lazy: FastAPI only for this command
    from mmssl.serve.search import open_service  # lazy: torch and the run only after the checks

    device = pick_device(args.device)
    lanes, threads = _lanes(args, device)  # with --embedders, theirs (open_service)
    torch.set_num_threads(threads)
    max_batch = args.max_batch if args.max_batch is not None else (8 if device.type == "cuda" else 1)
    quantize = None if args.quantize == "none" else args.quantize
    service = open_service(args.index, device, args.checkpoint, max_batch, lanes, quantize, args.embedders)
    return service, create_app(service, args.max_upload_mb, args.max_seconds, args.max_k, args.workers)


def _serve(app, sock: socket.socket) -> None:
    import uvicorn  # lazy: the server library only for this command

    # uvloop's event loop and httptools' HTTP parser (C) instead of asyncio's and h11 (Python):
    # less of the server process's core per request (BENCHMARKS.md, "Search service")
    config = uvicorn.Config(app, loop="uvloop", http="httptools", log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    server.run(sockets=[sock])


def _worker(args: argparse.Namespace, sock: socket.socket, ready, parent: int) -> None:
    """One more server process (spawned): load, say so on ``ready``, serve ``sock`` until stopped
    or until the process ``parent`` ends."""
    watch_parent(parent)
    try:
        _, app = _app(args)
    except Exception as err:  # the parent reports it; this process only ends
        ready.put(f"{type(err).__name__}: {err}")
        return
    ready.put(None)
    _serve(app, sock)


def start_workers(args: argparse.Namespace, sock: socket.socket) -> list:
    """``args.workers - 1`` spawned processes serving ``sock`` beside this one, once all have
    loaded; a ``ConfigError`` with the first one's error when one cannot load (all stopped)."""
    ctx = mp.get_context("spawn")  # torch and its threads are not fork-safe
    ready = ctx.Queue()
    # only the options, not the parser's handler: what a spawned process unpickles
    options = argparse.Namespace(**{k: v for k, v in vars(args).items() if not callable(v)})
    procs = [
        ctx.Process(
            target=_worker, args=(options, sock, ready, os.getpid()), daemon=True, name=f"mmssl-serve-{i}"
        )
        for i in range(1, args.workers)
    ]
    for proc in procs:
        proc.start()
    errors, pending = [], len(procs)
    while pending and not errors:
        try:
            message = ready.get(timeout=1.0)
        except queue.Empty:
            if any(proc.exitcode is not None for proc in procs) and ready.empty():
                errors.append("it exited while loading")
            continue
        pending -= 1
        if message is not None:
            errors.append(message)
    if errors:
        stop_workers(procs)
        raise ConfigError(f"--workers {args.workers}: a worker could not load ({errors[0]})")
    return procs


def stop_workers(procs: list) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.join(timeout=20)
        if proc.is_alive():
            proc.kill()


def run(args: argparse.Namespace) -> int:
    check_limits(args)
    service, app = _app(args)
    for note in service.notes:
        print(f"note: {note}", file=sys.stderr)
    sock = listen(args.host, args.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    if not ipaddress.ip_address(host).is_loopback:
        print(f"warning: listening on {host}: other machines can query this index", file=sys.stderr)
    procs = start_workers(args, sock) if args.workers > 1 else []
    described = service.describe()["index"]
    print(
        f"serving {args.index} ({described['images']} images, {described['search']} search) "
        f"on http://{shown}:{port}/  (API: http://{shown}:{port}/docs)"
        + (f", {args.workers} workers" if args.workers > 1 else ""),
        flush=True,
    )
    try:
        _serve(app, sock)
    finally:
        stop_workers(procs)
        if service.embedders is not None:
            service.embedders.close()
    return 0
