"""Rank, world size and DataLoader worker, read in one place; explicit values always win.

Order of precedence for the rank and world size: the explicit argument, then an initialised
``torch.distributed`` process group, then the ``RANK``/``WORLD_SIZE`` environment variables that
``torchrun`` sets, then a single process. ``is None`` checks keep an explicit rank 0.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from .partition import check_rank


@dataclass(frozen=True)
class World:
    """Where this process sits: distributed rank and DataLoader worker."""

    rank: int = 0
    world_size: int = 1
    worker: int = 0
    num_workers: int = 1

    @property
    def global_worker(self) -> int:
        """This worker's number among all ``world_size * num_workers`` workers."""
        return self.rank * self.num_workers + self.worker

    @property
    def total_workers(self) -> int:
        return self.world_size * self.num_workers


def distributed_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``(rank, world_size)`` by the precedence in the module docstring."""
    if world_size is None or rank is None:
        env_rank, env_size = _from_process_group()
        if env_size is None and "WORLD_SIZE" in os.environ:
            env_rank, env_size = int(os.environ.get("RANK", "0")), int(os.environ["WORLD_SIZE"])
        if world_size is None:
            world_size = 1 if env_size is None else env_size
        if rank is None:
            rank = 0 if env_rank is None else env_rank
    check_rank(world_size, rank)
    return rank, world_size


def _from_process_group() -> tuple[int | None, int | None]:
    if "torch.distributed" not in sys.modules:  # no process group without it: skip torch's import
        return None, None
    try:
        import torch.distributed as dist
    except ImportError:  # torch is a dependency, but keep the core importable without it
        return None, None
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return None, None


def worker_info() -> tuple[int, int]:
    """``(worker id, number of workers)`` inside a DataLoader worker, else ``(0, 1)``."""
    from torch.utils.data import get_worker_info

    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def get_world(rank: int | None = None, world_size: int | None = None) -> World:
    """The :class:`World` of the calling process (call it inside ``__iter__`` to see the worker)."""
    r, size = distributed_rank(rank, world_size)
    w, nw = worker_info()
    return World(rank=r, world_size=size, worker=w, num_workers=nw)
