"""The one device picker of every command (``--device``) and of training (``train.device``)."""

from __future__ import annotations

import torch

from mmssl.errors import ConfigError


def pick_device(name: str, local_rank: int = 0, option: str = "--device") -> torch.device:
    """``auto`` (this process's CUDA device, ``cuda:<local_rank>``, when there is one, else the
    CPU), ``cpu``, ``cuda`` (``cuda:<local_rank>``) or ``cuda:N``. A CUDA device becomes the
    process's current one. ``option`` names the setting in errors."""
    if name not in ("auto", "cpu", "cuda") and not name.startswith("cuda:"):
        raise ConfigError(f"{option}: {name!r} is not one of auto, cpu, cuda (or cuda:N)")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{option}={name} but no CUDA device is available")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device(name) if name.startswith("cuda:") else torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device
