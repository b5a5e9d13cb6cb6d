"""``mmssl serve``: a speech-image search service over an index (``mmssl index``).

    mmssl serve --index INDEX_DIR [--host 127.0.0.1] [--port 8080] [--max-upload-mb 20]
                [--max-seconds 60] [--max-k 100] [--max-batch N] [--checkpoint RUN_OR_CKPT]
                [--device auto|cpu|cuda]

Loads the index and the run that made it once, then answers over HTTP until interrupted: the
API and page of ``mmssl.serve.app`` (search by speech upload or recording, or by text when the
run has a text tower; the indexed images and caption audio by id; ``/health``; ``/docs``).
Binds the loopback address unless ``--host`` says otherwise; ``--port 0`` takes a free port
(printed). A port in use, a missing or mixed index, or a run that cannot be loaded are one-line
errors before anything listens.
"""

from __future__ import annotations

import argparse
import ipaddress
import socket
import sys

from mmssl.devices import pick_device
from mmssl.errors import ConfigError


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


def check_limits(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be between 0 and 65535; got {args.port}")
    if not (
        args.max_upload_mb > 0
        and args.max_seconds > 0
        and args.max_k >= 1
        and (args.max_batch is None or args.max_batch >= 1)
    ):
        raise ConfigError("--max-upload-mb, --max-seconds, --max-k and --max-batch must be positive")


def listen(host: str, port: int) -> socket.socket:
    """A bound socket, or a ``ConfigError`` naming the address (in use, not this machine's)."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        family = socket.AF_INET  # a host name
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ConfigError(
            f"--host {host} --port {port}: cannot listen there ({err.strerror or err})"
        ) from None
    sock.listen(128)
    return sock


def run(args: argparse.Namespace) -> int:
    check_limits(args)
    from mmssl.serve.search import open_service  # lazy: torch and the run only after the checks

    device = pick_device(args.device)
    max_batch = args.max_batch if args.max_batch is not None else (8 if device.type == "cuda" else 1)
    service = open_service(args.index, device, args.checkpoint, max_batch)
    for note in service.notes:
        print(f"note: {note}", file=sys.stderr)
    import uvicorn  # lazy: the server library only for this command

    from mmssl.serve.app import create_app  # lazy: FastAPI only for this command

    app = create_app(service, args.max_upload_mb, args.max_seconds, args.max_k)
    sock = listen(args.host, args.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    if not ipaddress.ip_address(host).is_loopback:
        print(f"warning: listening on {host}: other machines can query this index", file=sys.stderr)
    described = service.describe()["index"]
    print(
        f"serving {args.index} ({described['images']} images, {described['search']} search) "
        f"on http://{shown}:{port}/  (API: http://{shown}:{port}/docs)",
        flush=True,
    )
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    server.run(sockets=[sock])
    return 0
