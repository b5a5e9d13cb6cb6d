"""``mmssl serve`` as a user starts it, in a child process on a free loopback port, for tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def serving(index: Path, *options: str, timeout: float = 120.0):
    """Yield the base URL (``http://127.0.0.1:PORT``) of ``mmssl serve --index index --port 0``;
    the server is stopped on leaving."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    argv = [sys.executable, "-m", "mmssl.cli", "serve", "--index", str(index), "--port", "0", *options]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + timeout
        lines = []
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"mmssl serve exited {proc.wait()}:\n{''.join(lines)}")
            lines.append(line)
            found = re.search(r"on (http://\S+?)/ ", line)
            if found:
                yield found.group(1)
                return
        raise RuntimeError(f"mmssl serve did not start in {timeout} s:\n{''.join(lines)}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
