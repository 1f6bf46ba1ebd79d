"""Helpers for data-parallel training under ``torchrun`` (gloo on CPU, nccl on GPU).

``torchrun --nproc_per_node N script.py`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_distributed` reads them and joins the
process group. Without those variables everything here degrades to a single process
(rank 0 of 1), so the same code runs with and without ``torchrun``.
"""
from __future__ import annotations

import logging
import os
from datetime import timedelta
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class WorldInfo(NamedTuple):
    rank: int
    world_size: int
    local_rank: int


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def env_world_info() -> WorldInfo:
    """Rank, world size and local rank as ``torchrun`` put them in the environment."""
    return WorldInfo(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0))


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0) -> WorldInfo:
    """Join the process group described by the environment; returns this process's :class:`WorldInfo`.

    ``backend`` defaults to nccl when CUDA is available and gloo otherwise. With
    ``WORLD_SIZE`` unset or 1 this initialises nothing. Calling it again once the group
    exists is a no-op. On CUDA it also selects the device ``cuda:LOCAL_RANK``.
    """
    if is_initialized():
        return world_info()
    info = env_world_info()
    if info.world_size <= 1:
        return info
    if not 0 <= info.rank < info.world_size:
        raise ValueError(f"RANK={info.rank} is outside [0, WORLD_SIZE={info.world_size})")
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise ValueError(f"WORLD_SIZE={info.world_size} but {var} is not set (launch with torchrun)")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=info.rank,
        world_size=info.world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    log.info("joined process group: rank %d of %d (local rank %d, %s)",
             info.rank, info.world_size, info.local_rank, backend)
    return info


def destroy_distributed() -> None:
    """Leave the process group if one was joined."""
    if is_initialized():
        dist.destroy_process_group()


def world_info() -> WorldInfo:
    """(rank, world_size, local_rank) of the running process group, else from the environment."""
    if is_initialized():
        return WorldInfo(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))
    env = env_world_info()
    # environment says distributed but no group was joined: this process is alone
    return WorldInfo(0, 1, 0) if env.world_size > 1 else env


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): the one that logs and writes files."""
    return world_info().rank == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over ranks (a new tensor; ``t`` itself when not distributed)."""
    if not is_initialized() or dist.get_world_size() == 1:
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (picklable objects)."""
    if not is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (picklable objects)."""
    if not is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
