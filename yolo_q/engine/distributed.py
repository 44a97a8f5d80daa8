"""Distributed (DDP) helpers. Single-process runs need none of this: every function works, and
is a no-op, when ``torch.distributed`` is not initialised.

Launch with ``torchrun --nproc_per_node N tools/train.py ...``; :func:`init_distributed` reads
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` and uses NCCL on CUDA, gloo on CPU.
"""
from __future__ import annotations

import os
import sys
from datetime import timedelta
from typing import Dict, NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel


class DistInfo(NamedTuple):
    rank: int
    world_size: int
    local_rank: int


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_dist() and get_world_size() > 1:
        dist.barrier()


def init_distributed(backend: Optional[str] = None, timeout_s: float = 1800.0) -> DistInfo:
    """Initialise the process group from torchrun's env vars (no-op for a single process).

    ``backend`` defaults to ``nccl`` when CUDA is available, else ``gloo``. On CUDA the
    current device is set to ``LOCAL_RANK``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world <= 1 or is_dist():
        return DistInfo(get_rank(), get_world_size(), local_rank)
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    return DistInfo(rank, world, local_rank)


def cleanup() -> None:
    """Leave the process group. After a normal run all ranks meet at a barrier first: a rank
    that destroys the group while a peer's last collective is still in flight makes gloo abort
    the process ("terminate called without an active exception", seen once in the 2-process
    DDP test). When an exception is propagating (called from a ``finally``) there is no
    barrier: the peers may never reach it."""
    if is_dist():
        try:
            if sys.exc_info()[0] is None:
                dist.barrier()
        finally:
            dist.destroy_process_group()


def resolve_device(spec: str = "auto", local_rank: Optional[int] = None) -> torch.device:
    """``train.device`` -> ``torch.device``: ``auto`` is ``cuda`` when available else ``cpu``;
    a bare ``cuda`` becomes ``cuda:LOCAL_RANK`` in a distributed run."""
    spec = str(spec).strip().lower()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"train.device='{spec}' but CUDA is not available; "
                             f"use 'cpu' or 'auto'")
        if spec == "cuda":
            if local_rank is None:
                local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            spec = f"cuda:{local_rank}"
    try:
        return torch.device(spec)
    except RuntimeError:
        raise ValueError(f"train.device: invalid device '{spec}', expected auto | cpu | cuda | "
                         f"cuda:N") from None


def wrap_model(model: nn.Module, device: torch.device, sync_bn: bool = False,
               find_unused_parameters: bool = False) -> nn.Module:
    """Wrap in DistributedDataParallel when running distributed; otherwise return ``model``."""
    if not is_dist() or get_world_size() <= 1 or isinstance(model, DistributedDataParallel):
        return model
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, output_device=ids[0] if ids else None,
                                   find_unused_parameters=find_unused_parameters)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside a (Distributed)DataParallel wrapper."""
    if isinstance(model, (DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


def all_true(flag: bool, device: torch.device) -> bool:
    """True on every rank iff ``flag`` is True on every rank (one tiny all-reduce)."""
    if not is_dist() or get_world_size() <= 1:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0.5)


def reduce_dict(values: Dict[str, float], device: torch.device, average: bool = True
                ) -> Dict[str, float]:
    """All-reduce a dict of numbers (same keys on every rank); for logging loss parts.
    Must be called on every rank."""
    if not values or not is_dist() or get_world_size() <= 1:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    if average:
        t /= get_world_size()
    return dict(zip(keys, t.tolist()))


def broadcast_object(obj, src: int = 0):
    """Send a picklable object from rank ``src`` to every rank (returns it everywhere)."""
    if not is_dist() or get_world_size() <= 1:
        return obj
    holder = [obj if get_rank() == src else None]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]
