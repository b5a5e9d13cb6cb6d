"""``mmssl`` commands that do not depend on each other, run at the same time.

On a 2-core CPU, two one-thread training runs side by side get through about 1.3 times the
audio of one two-thread run after the other (BENCHMARKS.md, "Two runs side by side"): the
small model's operations are too small for two threads to share well. ``mmssl demo`` runs its
two fine-tunings on the labelled subset this way, and their evaluations.

Each command runs in its own process (``python -m mmssl.cli``) with ``cores // n`` threads;
its output goes to a log file, and one progress bar per command follows the ``step/total``
counter that the command's own progress bar writes there.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from mmssl.errors import MmsslError

# the counter of a tqdm bar: "135/300 [" (steps, records, cells)
COUNTER = re.compile(rb"(\d+)/(\d+) \[")
POLL_SECONDS = 1.0


@dataclass
class Job:
    """One command line (``mmssl`` arguments) and the file its output goes to."""

    title: str
    argv: list[str]
    log: Path


def latest_counter(log: Path) -> tuple[int, int] | None:
    """The last ``n/total`` a progress bar wrote into ``log``, or None (none yet, or no file)."""
    try:
        with log.open("rb") as handle:
            handle.seek(max(0, log.stat().st_size - 4096))
            found = COUNTER.findall(handle.read())
    except OSError:
        return None
    return (int(found[-1][0]), int(found[-1][1])) if found else None


def follow(bar: tqdm, counter: tuple[int, int]) -> None:
    """Move ``bar`` to a command's ``counter`` (n, total). A counter with another total, or one
    that went back, is the command's next progress bar (its validation after its training,
    say): the bar starts over, so its rate and time left are that counter's own."""
    if counter[1] != bar.total or counter[0] < bar.n:
        bar.reset(total=counter[1])
    bar.n = counter[0]
    bar.refresh()


def run_together(jobs: list[Job], cores: int | None = None) -> dict[str, float]:
    """Run ``jobs`` at the same time, each with ``cores // len(jobs)`` threads (at least one);
    seconds each took, by title. ``MmsslError`` naming the failed commands and their logs when
    one exits with a non-zero status (the others run to their end); the processes are stopped
    if this one is interrupted."""
    cores = cores or os.cpu_count() or 1
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // len(jobs)))}
    start, running, seconds = time.time(), [], {}
    bars = [tqdm(total=1, desc=job.title[:48], position=i, leave=True, unit="") for i, job in enumerate(jobs)]
    try:
        for job in jobs:
            job.log.parent.mkdir(parents=True, exist_ok=True)
            with job.log.open("wb") as log:  # the child keeps its own descriptor
                command = [sys.executable, "-m", "mmssl.cli", *job.argv]
                running.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env))
        while len(seconds) < len(jobs):
            time.sleep(POLL_SECONDS)
            for job, process, bar in zip(jobs, running, bars):
                counter = latest_counter(job.log)
                if counter is not None and job.title not in seconds:
                    follow(bar, counter)
                if process.poll() is not None and job.title not in seconds:
                    seconds[job.title] = round(time.time() - start, 1)
    finally:
        for process in running:
            if process.poll() is None:
                process.terminate()
                process.wait()
        for bar in bars:
            bar.close()
    failed = [(job, process.returncode) for job, process in zip(jobs, running) if process.returncode != 0]
    if failed:
        what = (f"`mmssl {job.argv[0]}` ({job.title}) exited with {c}, see {job.log}" for job, c in failed)
        raise MmsslError("; ".join(what))
    return seconds
