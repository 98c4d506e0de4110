"""Per-sample checksums: taken by the indexer, verified by the loaders where a sample is cut out.

The checksum covers exactly the byte range both loaders read for a sample, ``[offset, offset +
length)`` of its tar (headers, member data and padding), so one hash of the bytes in hand says
whether they are the bytes that were indexed. ``xxh3_64`` (xxhash, a core dependency) is one of the
fastest well-kept non-cryptographic hashes; ``benchmarks/streaming_io.py`` measures what the check
costs the loaders (``verify=False`` turns it off). The shard fingerprint catches most rewrites when an
index is loaded; the checksum catches what it cannot: a change between its sampled blocks, with
size and mtime restored, or a shard rewritten after the index was loaded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import xxhash
from numpy.typing import NDArray

from .errors import ChecksumError

#: The algorithm's name, stored in the index metadata ``checksum`` (``"none"``: no checksums).
CHECKSUM = "xxh3_64"
NO_CHECKSUM = "none"


#: The digest function itself (:func:`checksum` without the wrapper), for the loaders' hot loop.
digest: Callable[[bytes | bytearray | memoryview], int] = xxhash.xxh3_64_intdigest


def checksum(buf: bytes | bytearray | memoryview) -> int:
    """The ``xxh3_64`` digest of ``buf`` as an unsigned 64-bit integer.

    Example:
        >>> checksum(b"abc")
        8696274497037089104
    """
    return int(xxhash.xxh3_64_intdigest(buf))


def check_sample(
    buf: bytes | bytearray | memoryview,
    expected: int,
    *,
    shard: str,
    key: str | Callable[[], str],
    offset: int,
) -> None:
    """Refuse the bytes of one sample unless their checksum is the one in the index.

    Args:
        buf: the sample's bytes, ``[offset, offset + len(buf))`` of ``shard``.
        expected: the index's ``checksum`` for this sample.
        shard, key, offset: where the bytes came from, for the message; ``key`` may be a
            function, called only when the check fails (a key lookup costs more than the hash).

    Raises:
        ChecksumError: the bytes changed since indexing (names the shard, key and fix).
    """
    got = checksum(buf)
    if got != expected:
        if callable(key):
            key = key()
        raise ChecksumError(
            f"shard {shard}: sample {key!r} (bytes [{offset}, {offset + len(buf)})) has checksum "
            f"{got:016x} but its index says {int(expected):016x}: the shard changed since "
            f"indexing; run `rsprune-data index {shard} --force ...` again (or pass verify=False "
            "to skip the check)"
        )


def check_key(got: str, expected: str, *, shard: str, offset: int) -> None:
    """Refuse a sample whose ``__key__`` is not the one the index has at its position.

    Raises:
        StaleIndexError: names the shard, both keys and the fix.
    """
    if got != expected:
        from .errors import StaleIndexError

        raise StaleIndexError(
            f"shard {shard}: the sample at byte {offset} has key {got!r} but the index says "
            f"{expected!r}: the shard changed since indexing; run `rsprune-data index {shard}` "
            "again"
        )


def range_checksums(path: str, ranges: Sequence[tuple[int, int]]) -> NDArray[np.uint64]:
    """Checksums of byte ranges ``(offset, length)`` of a local file, for hand-made indexes.

    Example:
        >>> from rsprune_data.tario import scan_tar
        >>> ts = scan_tar("shard.tar")  # doctest: +SKIP
        >>> sums = range_checksums("shard.tar", [(t.offset, t.length) for t in ts])  # doctest: +SKIP
    """
    from .tario import read_ranges

    return np.array([checksum(b) for b in read_ranges(path, ranges)], dtype=np.uint64)
