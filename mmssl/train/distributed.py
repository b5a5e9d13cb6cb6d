"""The one place that reads the distributed environment torchrun sets.

``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` come from torchrun (single or multi node, its
rendezvous); nothing here launches processes. The rank and world size are handed on as plain
arguments (objective builders take ``rank``/``world_size``), never read elsewhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mmssl.errors import ConfigError, DataError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_from_torchrun() -> DistEnv:
    """Rank, world size and local rank from the environment (1 process when unset)."""
    try:
        return DistEnv(
            rank=int(os.environ.get("RANK", 0)),
            world_size=int(os.environ.get("WORLD_SIZE", 1)),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        )
    except ValueError as err:
        raise ConfigError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers: {err}") from None


def init_process_group(env: DistEnv, device: torch.device, timeout_s: float = 1800.0) -> None:
    """NCCL on CUDA (with gloo beside it for the odd CPU tensor), gloo on the CPU; a no-op for
    one process or an existing group."""
    if not env.enabled or dist.is_initialized():
        return
    backend = "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(
        backend, rank=env.rank, world_size=env.world_size, timeout=timedelta(seconds=timeout_s), **kwargs
    )


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.enabled and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(x: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Mean over ranks (in place on a copy); identity for one process."""
    if not env.enabled:
        return x
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x / env.world_size


def all_reduce_sum(x: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if not env.enabled:
        return x
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def wrap_model(
    model: nn.Module, env: DistEnv, device: torch.device, strategy: str, find_unused: bool = False
) -> nn.Module:
    """Wrap for data parallelism: ``ddp`` or ``fsdp`` (FSDP2 ``fully_shard``); ``none`` or one
    process returns the model as is.

    FSDP2 shards every trainable child of an ``nn.ModuleList`` (the transformer layers, the
    usual unit), then the root, so each layer's parameters are gathered only around its use.
    """
    if strategy not in ("ddp", "fsdp", "none"):
        raise ConfigError(f"train.strategy: {strategy!r} is not one of ddp, fsdp, none")
    if not env.enabled or strategy == "none":
        return model
    if strategy == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)
    # lazy: FSDP2, only when a run shards its model
    from torch.distributed.fsdp import fully_shard

    for module in list(model.modules()):
        if isinstance(module, nn.ModuleList):
            for layer in module:
                if any(p.requires_grad for p in layer.parameters()):
                    fully_shard(layer)
    fully_shard(model)
    return model


def is_sharded(model: nn.Module) -> bool:
    """True for an FSDP2 model (its state dicts are collectives)."""
    # lazy: FSDP2, only when a run shards its model
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@torch.no_grad()
def load_full_into_shards(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a full (unsharded) state dict into an FSDP2 model, each rank keeping its own shard.

    Done by hand rather than with ``set_model_state_dict`` so that a module registered under two
    names (its tensors appear under both in the file) loads once, by its first name.
    """
    # lazy: FSDP2, only when a run shards its model
    from torch.distributed.tensor import DTensor, distribute_tensor

    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    missing = sorted(set(tensors) - set(state))
    if missing:
        raise DataError(f"checkpoint lacks {len(missing)} tensors of the model, e.g. {missing[:3]}")
    for name, tensor in tensors.items():
        full = state[name].to(tensor.device, tensor.dtype)
        if isinstance(tensor, DTensor):
            # every rank holds the full tensor: take the local shard without communication
            full = distribute_tensor(full, tensor.device_mesh, tensor.placements, src_data_rank=None)
        tensor.copy_(full)


def set_grad_sync(model: nn.Module, enabled: bool) -> None:
    """Turn gradient all-reduce on or off for the micro-batches of an accumulated step.

    DDP has a ``require_backward_grad_sync`` flag (what ``no_sync`` toggles); FSDP2 modules have
    ``set_requires_gradient_sync``.
    """
    if hasattr(model, "require_backward_grad_sync"):
        model.require_backward_grad_sync = enabled
    elif hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)
