"""Fetch runs of a remote shard by byte range through fsspec, with bounded concurrency and retries.

Shape: ``(url, Runs)`` -> one ``bytes`` per run, in run order. Runs go out in batches of at most
``concurrency`` ranges (and ``max_batch_bytes``) with ``fs.cat_ranges``, which async filesystems
(HTTP, S3, GCS) send concurrently; while the caller consumes one batch the next is already in
flight (one background thread). Every result is checked for its exact length: a failed range
(5xx, timeout, reset, short or overlong body) is retried with exponential backoff, alone; when
:attr:`RetryPolicy.attempts` are used up, :class:`RemoteReadError` names the URL, the range and
the last error. A missing object or a denied request is not retried.

Any fsspec protocol works (``https://``, ``s3://``, ``gs://``, ``hf://``, ...); options such as
credentials or endpoints come in ``storage_options`` (fsspec's own name for them).
"""

from __future__ import annotations

import hashlib
import os
import selectors
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from ..errors import ConfigError, RsPruneError, ShardError
from .runs import Runs

__all__ = [
    "DEFAULT_CONCURRENCY",
    "RemoteFile",
    "RemoteReadError",
    "RetryPolicy",
    "open_url",
    "remote_metadata",
]

#: Ranges in flight per reader (per DataLoader worker; up to twice that while the next read block
#: is fetched ahead). ``benchmarks/remote_io.py --ratios 0.85 --delay 0 0.01 --gaps 4096
#: --concurrency C``, 22 Harvey shards over nginx on loopback, 85% pruned, one process, the same
#: bytes: with 10 ms added 2.18 / 1.17 / 0.65 / 0.40 s for C = 16 / 32 / 64 / 128; without added
#: latency 0.25 / 0.27 / 0.32 / 0.33 s (more in flight only costs CPU there). 64 is between.
#: s3fs (aiobotocore) opens at most 10 connections per client unless told otherwise: pass
#: ``storage_options={"config_kwargs": {"max_pool_connections": 64}}`` to use this many.
DEFAULT_CONCURRENCY = 64
#: Ranges of one ``cat_ranges`` call, in windows of ``concurrency``: with one call per window the
#: slowest request of each window held up the next (``benchmarks/remote_io.py``, 10 ms added).
_WINDOWS = 8
_FP_BYTES, _FP_BLOCKS = 64 * 1024, 32  # the sampling of index.shard_fingerprint
_NOT_TRANSIENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotImplementedError)


class RemoteReadError(ShardError):
    """A remote range could not be read after every retry (the message names the URL)."""


@dataclass(frozen=True)
class RetryPolicy:
    """How transient failures of remote reads are retried.

    Attributes:
        attempts: tries per range in all (1 = no retry).
        backoff: seconds before the first retry; doubles after each, up to ``max_backoff``.
        max_backoff: the longest wait between two tries.
    """

    attempts: int = 5
    backoff: float = 0.1
    max_backoff: float = 5.0

    def __post_init__(self) -> None:
        if (
            isinstance(self.attempts, bool)
            or not isinstance(self.attempts, int)
            or self.attempts < 1
        ):
            raise ConfigError(
                f"RetryPolicy.attempts must be an integer >= 1, got {self.attempts!r}"
            )
        for name in ("backoff", "max_backoff"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
                raise ConfigError(
                    f"RetryPolicy.{name} must be a number of seconds >= 0, got {value!r}"
                )

    def wait(self, attempt: int) -> float:
        """Seconds to wait after failed try number ``attempt`` (1-based)."""
        doublings = min(attempt - 1, 64)  # 2 ** 64 times any backoff is past any max_backoff
        return float(min(self.max_backoff, self.backoff * 2.0**doublings))


_loop_pid = [os.getpid()]


def _after_fork() -> None:
    """fsspec's async loop runs in a thread of the process that started it; a forked DataLoader
    worker inherits the loop object without the thread, and every call would hang on it.
    ``fsspec.asyn.reset_lock`` makes the child start its own (fsspec does not do it on fork)."""
    if _loop_pid[0] != os.getpid():
        import fsspec.asyn

        fsspec.asyn.reset_lock()
        _loop_pid[0] = os.getpid()


def _detach_inherited_loop() -> None:
    """Run in a forked child: give the parent's fsspec loop, inherited as a copy, a selector of
    the child's own.

    The copy's epoll descriptor names the parent's epoll set. When the child drops an inherited
    filesystem, fsspec's finalizer closes its session through that loop, and every socket it
    unregisters is taken out of the *parent's* set: the parent then never sees the replies on
    its pooled keep-alive connections and waits for aiohttp's timeout (300 s). With a fresh
    selector the child's unregistering finds nothing and the parent's set is left alone. The
    loop is also marked stopped, so the finalizer closes the connector at once instead of waiting
    0.1 s on a loop that has no thread here."""
    asyn = sys.modules.get("fsspec.asyn")
    inherited = getattr(asyn, "loop", [None])[0]
    selector = getattr(inherited, "_selector", None)
    if inherited is None or selector is None:
        return
    inherited._selector = selectors.DefaultSelector()
    selector.close()  # the child's copy of the descriptor only; the parent's set stays open
    if hasattr(inherited, "_thread_id"):
        inherited._thread_id = None  # asyncio's own mark of a running loop; its thread is gone
    _after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_detach_inherited_loop)


def open_url(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    """``(filesystem, path)`` for ``url`` (fsspec's ``url_to_fs``), safe in forked workers."""
    from fsspec.core import url_to_fs

    _after_fork()

    try:
        fs, path = url_to_fs(url, **dict(storage_options or {}))
    except (ImportError, ValueError) as exc:
        raise ConfigError(
            f"cannot open {url!r} with fsspec: {exc} (install the filesystem's "
            "package, for example `pip install 'rsprune-data[s3]'`, or fix "
            "storage_options)"
        ) from exc
    return fs, str(path)


class RemoteFile:
    """Ranged reads of one remote shard (module docstring).

    Args:
        url: the shard's URL.
        storage_options: fsspec options for its filesystem.
        concurrency: ranges in flight at once.
        retry: the :class:`RetryPolicy`.
        max_batch_bytes: bytes asked in one batch at most (bounds memory).
        sleep: the wait function (tests pass a recorder).
        fs: an already opened ``(filesystem, path)`` for ``url``.
    """

    def __init__(
        self,
        url: str,
        storage_options: Mapping[str, Any] | None = None,
        *,
        concurrency: int = DEFAULT_CONCURRENCY,
        retry: RetryPolicy | None = None,
        max_batch_bytes: int = 64 << 20,
        sleep: Callable[[float], None] = time.sleep,
        fs: tuple[Any, str] | None = None,
    ) -> None:
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ConfigError(f"`concurrency` must be an integer >= 1, got {concurrency!r}")
        self.url = url
        self.fs, self.path = open_url(url, storage_options) if fs is None else fs
        self.concurrency = concurrency
        self.retry = retry or RetryPolicy()
        self.max_batch_bytes = max_batch_bytes
        self.sleep = sleep
        self.bytes_read = 0  # successful payload bytes (retries of failed ranges not counted)
        self.retries = 0

    def _cat(self, paths: list[str], starts: list[int], stops: list[int]) -> list[Any]:
        if getattr(self.fs, "async_impl", False):  # fsspec keeps `concurrency` in flight, sliding
            out = self.fs.cat_ranges(
                paths, starts, stops, on_error="return", batch_size=self.concurrency
            )
        else:
            out = self.fs.cat_ranges(paths, starts, stops, on_error="return")
        return list(out)

    def fetch(
        self,
        starts: list[int],
        stops: list[int],
        others: Sequence[RemoteFile | None] | None = None,
    ) -> list[bytes]:
        """The bytes of ranges ``[starts[i], stops[i])``, each exactly, retried as needed.

        ``others[i]``, where given and not None, is another :class:`RemoteFile` on the same
        filesystem that range ``i`` belongs to: ranges of several shards then share one window of
        ``concurrency`` requests (:func:`rsprune_data.reading.read_remote_pieces`).
        """
        owner: list[RemoteFile] = [
            self if o is None else o for o in (others or [None] * len(starts))
        ]
        out: list[bytes | None] = [None] * len(starts)
        todo = list(range(len(starts)))
        errors: dict[int, str] = {}
        for attempt in range(1, self.retry.attempts + 1):
            got = self._cat(
                [owner[i].path for i in todo],
                [starts[i] for i in todo],
                [stops[i] for i in todo],
            )
            failed = []
            for i, res in zip(todo, got, strict=True):
                want = stops[i] - starts[i]
                if isinstance(res, bytes | bytearray) and len(res) == want:
                    out[i] = bytes(res)
                    owner[i].bytes_read += want
                    continue
                if isinstance(res, _NOT_TRANSIENT):
                    raise RemoteReadError(
                        f"cannot read {owner[i].url}: {type(res).__name__}: {res} "
                        "(check the URL and storage_options)"
                    ) from res
                errors[i] = (
                    f"{type(res).__name__}: {res}"
                    if isinstance(res, BaseException)
                    else f"{len(res)} bytes instead of {want}"
                )
                failed.append(i)
            if not failed:
                return out  # type: ignore[return-value]
            todo = failed
            if attempt < self.retry.attempts:
                self.retries += len(failed)
                self.sleep(self.retry.wait(attempt))
        i = todo[0]
        raise RemoteReadError(
            f"reading {owner[i].url} bytes [{starts[i]}, {stops[i]}) failed "
            f"{self.retry.attempts} time(s), last: {errors[i]} ({len(todo)} range(s) failed in "
            "all): check the server, or raise RetryPolicy.attempts"
        )

    def batches(self, starts: list[int], stops: list[int]) -> Iterator[tuple[int, int]]:
        """Slices of the ranges fetched by one call: up to ``_WINDOWS * concurrency`` ranges
        (fsspec slides ``concurrency`` requests over them) and ``max_batch_bytes`` bytes."""
        a, n = 0, len(starts)
        while a < n:
            b, size = a, 0
            while (
                b < n
                and b - a < _WINDOWS * self.concurrency
                and (b == a or size + stops[b] - starts[b] <= self.max_batch_bytes)
            ):
                size += stops[b] - starts[b]
                b += 1
            yield a, b
            a = b

    def read_runs(self, runs: Runs) -> Iterator[bytes]:
        """One buffer per run, in run order; the next batch is fetched while one is consumed
        (at most ``2 * concurrency`` requests in flight)."""
        starts, stops = runs.start.tolist(), runs.stop.tolist()
        batches = list(self.batches(starts, stops))
        if not batches:
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="rsprune-fetch") as pool:
            ahead: Future[list[bytes]] = pool.submit(
                self.fetch, starts[slice(*batches[0])], stops[slice(*batches[0])]
            )
            try:
                for k in range(len(batches)):
                    bufs = ahead.result()
                    if k + 1 < len(batches):
                        nxt = slice(*batches[k + 1])
                        ahead = pool.submit(self.fetch, starts[nxt], stops[nxt])
                    yield from bufs
            finally:
                ahead.cancel()


def remote_metadata(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The index metadata tying an index to a remote shard (one ``info`` call, no data read).

    ``shard_fingerprint`` is the store's own checksum where it offers one (``ETag``, S3's
    ``ETag``, GCS's ``md5Hash``/``crc32c``, an HTTP ``Content-MD5`` or ``Digest``), prefixed with
    its name; otherwise a digest of sampled ranges (as :func:`rsprune_data.index.shard_fingerprint`
    for local files). ``shard_mtime_ns`` is ``0``: stores report modification times inconsistently.

    Raises:
        RemoteReadError: the object does not exist or cannot be reached.
    """
    fs, path = open_url(url, storage_options)
    try:
        info = fs.info(path)
    except FileNotFoundError as exc:
        raise RemoteReadError(
            f"remote shard {url} does not exist (HEAD/stat said not found): check the URL"
        ) from exc
    except (OSError, RsPruneError, Exception) as exc:  # fsspec backends raise their own types
        raise RemoteReadError(
            f"cannot stat remote shard {url}: {type(exc).__name__}: {exc}"
        ) from exc
    size = info.get("size")
    if size is None:
        raise RemoteReadError(
            f"remote shard {url}: the server reports no size (no "
            "Content-Length): byte ranges need it"
        )
    return {
        "shard": os.path.basename(urlparse(url).path) or url,
        "shard_size": str(int(size)),
        "shard_mtime_ns": "0",
        "shard_fingerprint": _fingerprint(url, fs, path, info, int(size)),
    }


def _fingerprint(url: str, fs: Any, path: str, info: Mapping[str, Any], size: int) -> str:
    for field in ("ETag", "etag", "md5Hash", "crc32c", "Content-MD5", "Digest", "checksum"):
        value = info.get(field)
        if value:
            return f"{field.lower()}:{str(value).strip(chr(34))}"
    # No checksum offered: sampled ranges, as index.shard_fingerprint reads from a local file.
    spans = [(0, min(size, _FP_BYTES))]
    spans += [
        (size * i // (_FP_BLOCKS + 1), min(size, size * i // (_FP_BLOCKS + 1) + 4096))
        for i in range(1, _FP_BLOCKS + 1)
    ]
    spans.append((max(0, size - _FP_BYTES), size))
    reader = RemoteFile(url, fs=(fs, path))
    h = hashlib.sha256(b"%d\n" % size)
    for part in reader.fetch([a for a, _ in spans], [b for _, b in spans]):
        h.update(part)
    return h.hexdigest()[:32]
