"""Reader threads of this process, one pool per purpose, rebuilt after a fork.

A DataLoader worker forked from a process that had started a pool inherits the pool object but
not its threads; every call would hang on it. Pools are therefore kept by process id, and a
process that finds only its parent's pool starts its own.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

__all__ = ["process_pool"]

_lock = threading.Lock()
_pools: dict[tuple[int, str], ThreadPoolExecutor] = {}


def process_pool(purpose: str, width: int) -> ThreadPoolExecutor:
    """This process's pool for ``purpose`` with at least ``width`` threads."""
    key = (os.getpid(), purpose)
    with _lock:
        pool = _pools.get(key)
        if pool is None or pool._max_workers < width:
            if pool is not None:
                pool.shutdown(wait=False)
            for stale in [k for k in _pools if k[0] != key[0]]:
                del _pools[stale]  # a parent's pools, copied by fork, have no threads here
            pool = _pools[key] = ThreadPoolExecutor(
                max_workers=width, thread_name_prefix=f"rsprune-{purpose}"
            )
        return pool
