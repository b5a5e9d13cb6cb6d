"""Checkpoints written atomically and loaded with ``weights_only=True``.

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
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from mmssl.errors import DataError
from mmssl.files import atomic_write

LATEST = "latest"
MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def rank_file(rank: int) -> str:
    return f"rank{rank}.pt"


def save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    """Tensors -> safetensors, atomically. Shared storage (tied weights) is stored once per name."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    data = save_safetensors_bytes(tensors)
    atomic_write(path, lambda f: f.write(data))


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


def latest_step_dir(ckpt_dir: Path) -> Path | None:
    """The folder ``latest`` names, or None when there is no complete checkpoint yet."""
    pointer = Path(ckpt_dir) / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    folder = Path(ckpt_dir) / name
    if not _STEP_DIR.match(name) or not (folder / MODEL_FILE).is_file() or not (folder / STATE_FILE).is_file():
        raise DataError(f"{pointer}: names {name!r}, which is not a complete checkpoint folder")
    return folder


def prune(ckpt_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoint folders (never the one ``latest`` names)."""
    if keep_last <= 0:
        return
    current = latest_step_dir(ckpt_dir)
    steps = sorted(p for p in Path(ckpt_dir).iterdir() if p.is_dir() and _STEP_DIR.match(p.name))
    for folder in steps[:-keep_last]:
        if current is None or folder.name != current.name:
            shutil.rmtree(folder, ignore_errors=True)


def resolve_weights(path: str | Path) -> Path:
    """A run folder, its ``checkpoints`` folder, a step folder or a ``.safetensors`` file ->
    the weights file (the latest checkpoint when given a folder)."""
    path = Path(path)
    if path.is_file():
        return path
    for ckpt_dir in (path / "checkpoints", path):
        if (ckpt_dir / LATEST).is_file():
            folder = latest_step_dir(ckpt_dir)
            assert folder is not None
            return folder / MODEL_FILE
    if (path / MODEL_FILE).is_file():
        return path / MODEL_FILE
    raise DataError(f"{path}: no checkpoint here (expected a run folder, a step folder or {MODEL_FILE})")


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The objective's state dict from a checkpoint (see ``resolve_weights`` for ``path``)."""
    file = resolve_weights(path)
    try:
        return load_safetensors_bytes(file.read_bytes())
    except Exception as err:  # safetensors raises its own error types
        raise DataError(f"{file}: cannot read weights: {err}") from err
