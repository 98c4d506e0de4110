"""Fetch runs from a local file with ``pread``, with the kernel's readahead under control.

Shape: ``(path, Runs)`` -> one ``bytes`` per run, in run order (:meth:`LocalFile.read_runs`), or
the runs back to back in a caller's buffer (:meth:`LocalFile.read_into`).

Why readahead matters: on a cold page cache Linux reads ahead of every ``pread`` (128 KiB and
growing on sequential patterns), so ranges of a few KiB pulled 0.37x of the shard bytes from disk
at 85% pruning. Three modes (``readahead=``):

- ``"planned"`` (the default) sets ``POSIX_FADV_RANDOM`` on the descriptor, which turns readahead
  off, and announces the next ``prefetch`` runs with ``POSIX_FADV_WILLNEED``, so the device still
  has several reads queued but only of the pages that were asked. The page is the floor: a sample
  that starts inside a page and ends inside another pulls both whole pages, so the Harvey samples
  of ``benchmarks/streaming_io.py`` (4.4 KB with their class file) at 85% pruning ask 0.160x of
  the shard bytes and pull 0.258x from the device cold (0.256x: the runs' pages, printed by the
  benchmark). Runs are first read with ``RWF_NOWAIT`` (from the page cache only) while they are
  cached, so a warm cache costs no ``fadvise`` per run; the first run that is not cached
  switches the rest of the read to announcing.
- ``"direct"`` reads with ``O_DIRECT``, past the page cache, aligned to the device's 512-byte
  sectors (4096 where the file system asks for it): tar members start and end on 512-byte
  boundaries, so the device returns the bytes asked and no more (0.161x there). ``prefetch``
  reads are in flight at once on a small thread pool (a direct read has no readahead to hide the
  device's latency; where the device does not overlap them, ``benchmarks/direct_io.py`` shows
  it). Every epoch reads the device again, so this is for corpora far larger than memory and for
  cold or network file systems; a file system without ``O_DIRECT`` (tmpfs before Linux 6.6, some
  FUSE file systems) falls back to ``"planned"`` with a warning.
- ``"kernel"`` leaves the kernel's default.
"""

from __future__ import annotations

import collections
import concurrent.futures
import errno
import mmap
import os
import warnings
from collections.abc import Iterator

from .. import _fsio
from ..errors import ConfigError, ShardError, ShardNotFoundError
from ._threads import process_pool
from .runs import Runs

__all__ = ["READAHEAD_MODES", "LocalFile", "pread_exact"]

READAHEAD_MODES = ("planned", "kernel", "direct")
_FADVISE = hasattr(os, "posix_fadvise")
_PREADV = hasattr(os, "preadv")  # not on Windows
_NOWAIT = getattr(os, "RWF_NOWAIT", 0)  # Linux: a read that fails instead of waiting for I/O
_DIRECT = hasattr(os, "O_DIRECT") and _PREADV
_ALIGNS = (512, 4096)  # O_DIRECT alignments tried in turn (sector, then page)


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
    if len(buf) == n:  # the common case, without the loop
        return buf
    buf += _fsio.pread_exact(fd, n - len(buf), offset + len(buf))  # the one home of the loop
    if len(buf) != n:
        raise _ends_early(name, offset + len(buf), offset, n)
    return buf


def _ends_early(name: str, at: int, offset: int, n: int) -> ShardError:
    return ShardError(
        f"shard {name} ends at byte {at}, inside the range [{offset}, {offset + n}) its index "
        "lists: the shard changed since indexing; run `rsprune-data index` again"
    )


class LocalFile:
    """One open shard file (module docstring).

    Args:
        path: the local file.
        readahead: ``"planned"``, ``"direct"`` or ``"kernel"`` (module docstring).
        prefetch: runs announced (``"planned"``) or read at once (``"direct"``) ahead of the one
            being consumed.

    Raises:
        ShardError: the file cannot be opened (the message names it).
    """

    def __init__(self, path: str, *, readahead: str = "planned", prefetch: int = 16) -> None:
        self.path = path
        mode = check_readahead(readahead)
        self.prefetch = prefetch
        self.fd = self.dfd = -1
        self.align = _ALIGNS[0]
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
        if mode == "direct":
            self.dfd = _open_direct(path)
            if self.dfd < 0:
                mode = "planned"
        self.direct = self.dfd >= 0
        self.planned = mode == "planned" and _FADVISE
        self.nowait = self.planned and _PREADV and _NOWAIT != 0
        if self.planned:
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)

    def willneed(self, start: int, stop: int) -> None:
        """Announce ``[start, stop)`` (``"planned"`` only)."""
        if self.planned:
            os.posix_fadvise(self.fd, start, stop - start, os.POSIX_FADV_WILLNEED)

    def read(self, start: int, stop: int) -> bytes:
        """The bytes ``[start, stop)`` exactly."""
        if self.direct:
            return self._read_direct(start, stop)
        return pread_exact(self.fd, stop - start, start, self.path)

    def read_runs(self, runs: Runs) -> Iterator[bytes]:
        """One buffer per run, in run order (module docstring)."""
        starts, stops = runs.start.tolist(), runs.stop.tolist()
        if self.direct:
            yield from self._read_runs_direct(starts, stops)
            return
        n, ahead, fd, path = len(starts), self.prefetch if self.planned else 0, self.fd, self.path
        for r in range(min(ahead, n)):
            os.posix_fadvise(fd, starts[r], stops[r] - starts[r], os.POSIX_FADV_WILLNEED)
        for r in range(n):
            if r + ahead < n and ahead:
                j = r + ahead
                os.posix_fadvise(fd, starts[j], stops[j] - starts[j], os.POSIX_FADV_WILLNEED)
            yield pread_exact(fd, stops[r] - starts[r], starts[r], path)

    def read_into(self, runs: Runs, out: memoryview) -> None:
        """The runs, back to back, into ``out`` (``runs.nbytes`` long): one ``preadv`` per run
        into memory the caller reuses (:mod:`rsprune_data.reading.arena`), no buffer per run."""
        starts, stops = runs.start.tolist(), runs.stop.tolist()
        if self.direct or not _PREADV:
            at = 0
            for buf in (
                self._read_runs_direct(starts, stops) if self.direct else self.read_runs(runs)
            ):
                out[at : at + len(buf)] = buf
                at += len(buf)
            return
        n, ahead, fd = len(starts), self.prefetch if self.planned else 0, self.fd
        at = first = 0
        if ahead and self.nowait:  # cached runs need no announcement: read them while they last
            first, at = self._read_cached(starts, stops, out)
        for r in range(first, min(first + ahead, n)):
            os.posix_fadvise(fd, starts[r], stops[r] - starts[r], os.POSIX_FADV_WILLNEED)
        for r in range(first, n):
            if r + ahead < n and ahead:
                j = r + ahead
                os.posix_fadvise(fd, starts[j], stops[j] - starts[j], os.POSIX_FADV_WILLNEED)
            size = stops[r] - starts[r]
            got = os.preadv(fd, [out[at : at + size]], starts[r])
            while got < size:  # rare: the kernel returned fewer bytes, or the file ends
                more = os.preadv(fd, [out[at + got : at + size]], starts[r] + got)
                if more <= 0:
                    raise _ends_early(self.path, starts[r] + got, starts[r], size)
                got += more
            at += size

    def _read_cached(self, starts: list[int], stops: list[int], out: memoryview) -> tuple[int, int]:
        """Read runs with ``RWF_NOWAIT`` (only from the page cache) until one is not cached:
        ``(runs read, bytes read)``. On a warm cache this saves the ``WILLNEED`` call per run."""
        at = 0
        for r in range(len(starts)):
            size = stops[r] - starts[r]
            try:
                got = os.preadv(self.fd, [out[at : at + size]], starts[r], _NOWAIT)
            except BlockingIOError:
                return r, at
            except OSError:  # a file system without RWF_NOWAIT
                self.nowait = False
                return r, at
            if got != size:  # partly cached, or the file ends: the blocking read decides
                return r, at
            at += size
        return len(starts), at

    # -- "direct"
    def _read_direct(self, start: int, stop: int) -> bytes:
        """``[start, stop)`` through the ``O_DIRECT`` descriptor, in aligned blocks."""
        if stop <= start:
            return b""
        while True:
            a = self.align
            lo, hi = start & ~(a - 1), (stop + a - 1) & ~(a - 1)
            buf = mmap.mmap(-1, hi - lo)  # page-aligned memory, as O_DIRECT needs
            try:
                got = 0
                while lo + got < stop:
                    k = os.preadv(self.dfd, [memoryview(buf)[got:]], lo + got)
                    if k <= 0:
                        raise _ends_early(self.path, lo + got, start, stop - start)
                    got += k
                return buf[start - lo : stop - lo]
            except ShardError:
                raise
            except OSError as exc:
                if exc.errno != errno.EINVAL or a == _ALIGNS[-1]:
                    raise ShardError(
                        f"cannot read shard {self.path} bytes [{start}, {stop}) with O_DIRECT: "
                        f"{exc.strerror or exc}; use readahead='planned'"
                    ) from exc
                self.align = _ALIGNS[_ALIGNS.index(a) + 1]  # the file system wants pages
            finally:
                buf.close()

    def _read_runs_direct(self, starts: list[int], stops: list[int]) -> Iterator[bytes]:
        window = max(1, self.prefetch)
        pool = process_pool("direct", window)
        pending: collections.deque[concurrent.futures.Future[bytes]] = collections.deque()
        nxt, n = 0, len(starts)
        try:
            while nxt < n or pending:
                while nxt < n and len(pending) < window:
                    pending.append(pool.submit(self._read_direct, starts[nxt], stops[nxt]))
                    nxt += 1
                yield pending.popleft().result()
        finally:  # let no read outlive this file's descriptors
            for f in pending:
                f.cancel()
            concurrent.futures.wait(pending)

    def close(self) -> None:
        for name in ("fd", "dfd"):
            fd = getattr(self, name, -1)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    def __enter__(self) -> LocalFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:  # noqa: SIM105 (at interpreter exit the contextlib module may be gone already)
            self.close()
        except (OSError, AttributeError, TypeError):
            pass


_warned_no_direct: set[str] = set()


def _open_direct(path: str) -> int:
    """An ``O_DIRECT`` descriptor of ``path``, or -1 (with a warning, once per folder) where the
    platform or the file system has none."""
    if not _DIRECT:
        why = "this platform has no O_DIRECT"
    else:
        try:
            return os.open(path, os.O_RDONLY | os.O_DIRECT)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise ShardError(f"cannot open shard {path}: {exc.strerror or exc}") from exc
            why = f"the file system of {os.path.dirname(path) or '.'} refuses O_DIRECT"
    folder = os.path.dirname(os.path.abspath(path))
    if folder not in _warned_no_direct:
        _warned_no_direct.add(folder)
        warnings.warn(
            f"readahead='direct': {why}; reading {folder} through the page cache "
            "(readahead='planned')",
            stacklevel=4,
        )
    return -1
