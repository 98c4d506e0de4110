"""One reusable read buffer per thread, so that a block's runs land in memory that is already there.

A block of ~1,000 small samples is a few MiB; a fresh buffer of that size comes from ``mmap`` and
goes back to the system when freed, so every block would pay one page fault per 4 KiB touched
(on a virtual machine, where faults are dear, about as much as reading it). The runs of a block are read
into this thread's arena instead, the samples cut out of it as new ``bytes``, and the arena is
reused by the next block. Per thread, because a loader may cut in several threads (torchdata's
thread mappers); after a fork the child keeps its own copy-on-write copy.
"""

from __future__ import annotations

import threading

__all__ = ["KEEP", "buffer"]

#: Largest arena kept between blocks; a larger block gets a buffer of its own (its samples are
#: large, so the page faults are small next to their decoding).
KEEP = 16 * 1024 * 1024

_local = threading.local()


def buffer(nbytes: int) -> bytearray:
    """A buffer of at least ``nbytes`` for this thread; its contents are undefined.

    The buffer is reused by this thread's next call: consume it (copy out what is kept) first,
    and hold no ``memoryview`` or numpy view of it past that (a view pins its size).
    """
    if nbytes > KEEP:
        return bytearray(nbytes)
    buf: bytearray | None = getattr(_local, "buf", None)
    if buf is None or len(buf) < nbytes:
        buf = _local.buf = bytearray(max(nbytes, 2 * len(buf) if buf is not None else 0))
        if len(buf) > KEEP:
            buf = _local.buf = bytearray(nbytes)
    return buf
