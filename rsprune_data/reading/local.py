"""Fetch runs from a local file with ``pread``, with the kernel's readahead under control.

Shape: ``(path, Runs)`` -> one ``bytes`` per run, in run order.

Why readahead matters: on a cold page cache Linux reads ahead of every ``pread`` (128 KiB and
growing on sequential patterns), so ranges of a few KiB pulled 0.37x of the shard bytes from disk
at 85% pruning. ``readahead="planned"`` (the default) sets ``POSIX_FADV_RANDOM`` on the descriptor,
which turns that off, and announces the next ``prefetch`` runs with ``POSIX_FADV_WILLNEED``, so the
device still has several reads queued but only of the bytes that were asked. On a warm cache both
are cheap (one ``fadvise`` per run); ``readahead="kernel"`` leaves the kernel's default.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from ..errors import ConfigError, ShardError, ShardNotFoundError
from .runs import Runs

__all__ = ["READAHEAD_MODES", "LocalFile", "pread_exact"]

READAHEAD_MODES = ("planned", "kernel")
_FADVISE = hasattr(os, "posix_fadvise")


def check_readahead(readahead: str) -> str:
    """Validate a ``readahead`` argument."""
    if readahead not in READAHEAD_MODES:
        raise ConfigError(f"`readahead` must be one of {list(READAHEAD_MODES)}, got {readahead!r}")
    return readahead


def pread_exact(fd: int, n: int, offset: int, name: str) -> bytes:
    """``n`` bytes at ``offset`` (several ``pread`` calls when the kernel returns fewer).

    Raises:
        ShardError: the file ends first (it changed since it was indexed).
    """
    buf = os.pread(fd, n, offset)
    if len(buf) == n:
        return buf
    parts, got = [buf], len(buf)
    while got < n:
        chunk = os.pread(fd, n - got, offset + got)
        if not chunk:
            raise ShardError(
                f"shard {name} ends at byte {offset + got}, inside the range [{offset}, "
                f"{offset + n}) its index lists: the shard changed since indexing; run "
                "`rsprune-data index` again"
            )
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


class LocalFile:
    """One open shard file (module docstring).

    Args:
        path: the local file.
        readahead: ``"planned"`` (``POSIX_FADV_RANDOM`` + ``WILLNEED`` of the planned runs) or
            ``"kernel"``.
        prefetch: runs announced ahead of the one being read (``"planned"`` only).

    Raises:
        ShardError: the file cannot be opened (the message names it).
    """

    def __init__(self, path: str, *, readahead: str = "planned", prefetch: int = 16) -> None:
        self.path = path
        self.planned = check_readahead(readahead) == "planned" and _FADVISE
        self.prefetch = prefetch
        try:
            self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        except OSError as exc:
            why = (
                f"cannot open shard {path}: {exc.strerror or exc}; it must be where it was "
                "when it was indexed"
            )
            if isinstance(exc, FileNotFoundError):  # callers may catch the builtin
                raise ShardNotFoundError(exc.errno, why, path) from exc
            raise ShardError(why) from exc
        if self.planned:
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)

    def willneed(self, start: int, stop: int) -> None:
        """Announce ``[start, stop)`` (no-op with ``readahead="kernel"``)."""
        if self.planned:
            os.posix_fadvise(self.fd, start, stop - start, os.POSIX_FADV_WILLNEED)

    def read(self, start: int, stop: int) -> bytes:
        """The bytes ``[start, stop)`` exactly."""
        return pread_exact(self.fd, stop - start, start, self.path)

    def read_runs(self, runs: Runs) -> Iterator[bytes]:
        """One buffer per run, in run order (module docstring)."""
        starts, stops = runs.start.tolist(), runs.stop.tolist()
        n, ahead, fd, path = len(starts), self.prefetch if self.planned else 0, self.fd, self.path
        for r in range(min(ahead, n)):
            os.posix_fadvise(fd, starts[r], stops[r] - starts[r], os.POSIX_FADV_WILLNEED)
        for r in range(n):
            if r + ahead < n and ahead:
                j = r + ahead
                os.posix_fadvise(fd, starts[j], stops[j] - starts[j], os.POSIX_FADV_WILLNEED)
            yield pread_exact(fd, stops[r] - starts[r], starts[r], path)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> LocalFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(OSError, AttributeError):
            self.close()
