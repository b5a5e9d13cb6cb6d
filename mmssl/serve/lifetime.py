"""Child processes of ``mmssl serve`` (extra workers, embedders) that end with their parent."""

from __future__ import annotations

import os
import threading
import time


def _exit_with(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


def watch_parent(parent: int) -> None:
    """Leave this process within half a second of process ``parent`` ending, however it ended.
    A parent stopped by SIGTERM never reaches its ``finally`` (uvicorn re-raises the signal
    once it has shut down), and SIGKILL runs nothing: without this watch a worker would go on
    serving, orphaned, on the shared socket, and an embedder would wait for ever for work,
    holding its copy of the model."""
    threading.Thread(target=_exit_with, args=(parent,), daemon=True, name="parent-watch").start()
