"""What the trainer saves beside the weights, written atomically and loaded with
``weights_only=True``: optimizer, schedule, data position and random state; the ``latest``
pointer and pruning. Naming the folders and reading or writing the weights is the run
folders' business (``mmssl.runs``), so reading a run needs no trainer.

Layout of ``RUN/checkpoints``::

    step_00000500/model.safetensors   the objective's full state (encoders, heads, EMA teacher)
    step_00000500/train_state.pt      step, optimizer, schedule, data position, counters
    step_00000500/rank{R}.pt          each rank's data position and random generators
    latest                            the name of the newest complete checkpoint folder

Every file is written to a temporary name in its own folder, flushed, fsync-ed and moved into
place with ``os.replace``; ``latest`` is replaced last. A process killed at any moment
therefore leaves ``latest`` naming a checkpoint whose files are all complete.
"""

from __future__ import annotations

import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from mmssl.errors import DataError
from mmssl.files import atomic_write
from mmssl.runs import LATEST, STEP_DIR, latest_step_dir


def rank_file(rank: int) -> str:
    return f"rank{rank}.pt"


def save_state(obj: dict, path: Path) -> None:
    """Plain dicts/lists/numbers/tensors -> ``torch.save``, atomically."""
    atomic_write(path, lambda f: torch.save(obj, f))


def load_state(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise DataError(f"{path}: cannot read checkpoint state: {err}") from err


def capture_rng() -> dict:
    """This process's generators as plain tensors and tuples (``weights_only`` loadable)."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
    }


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))


def write_latest(ckpt_dir: Path, name: str) -> None:
    atomic_write(Path(ckpt_dir) / LATEST, lambda f: f.write(f"{name}\n".encode()))


def prune(ckpt_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoint folders (never the one ``latest`` names)."""
    if keep_last <= 0:
        return
    current = latest_step_dir(ckpt_dir)
    steps = sorted(p for p in Path(ckpt_dir).iterdir() if p.is_dir() and STEP_DIR.match(p.name))
    for folder in steps[:-keep_last]:
        if current is None or folder.name != current.name:
            shutil.rmtree(folder, ignore_errors=True)
