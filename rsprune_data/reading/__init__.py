"""The reading path shared by both loaders, as small stages.

::

    one read (a loader's block or batch): Pieces, one per shard, offsets in tar order
      -> runs.coalesce(offsets, lengths)      Runs: [start, stop) per read, samples per run
      -> local.LocalFile.read_into  (preadv into this thread's arena.buffer: RWF_NOWAIT while
                                    cached, else POSIX_FADV_RANDOM + WILLNEED of the planned
                                    runs, or O_DIRECT reads)
         fetch_remote               (fsspec cat_ranges, one window for all remote pieces,
                                    bounded concurrency, retries; copied into the arena)
         stream.stream_samples      (``pipe:``: one pass, unwanted samples dropped undecoded)
      -> samples.cut_block          webdataset dicts, one ``bytes`` per member copied out of the
                                    arena; checksum, then the key in the headers against the
                                    index row (a repeated member layout checked by prefix)

Stages take explicit inputs (a path or URL, ranges, lists) and never import the loaders or the
index. :func:`read_pieces` strings them together for one read (:func:`read_samples` for one
shard); :class:`ReadOptions` carries every knob, picklable, so DataLoader workers get the same
settings. ``samples.cut_runs`` (one buffer per run) is the same cut for callers holding run
buffers.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .._validate import check_int
from ..errors import ConfigError
from .arena import buffer
from .local import READAHEAD_MODES, LocalFile, check_readahead
from .remote import (
    DEFAULT_CONCURRENCY,
    RemoteFile,
    RemoteReadError,
    RetryPolicy,
    remote_metadata,
)
from .runs import Runs, coalesce
from .samples import Item, Piece, Sample, check_sample, cut_block, cut_runs
from .stream import stream_samples

__all__ = [
    "DEFAULT_CONCURRENCY",
    "DEFAULT_LOCAL_MAX_GAP",
    "DEFAULT_MAX_BLOCK",
    "DEFAULT_REMOTE_MAX_GAP",
    "READAHEAD_MODES",
    "LocalFile",
    "Piece",
    "ReadOptions",
    "RemoteFile",
    "RemoteReadError",
    "RetryPolicy",
    "Runs",
    "Sample",
    "check_sample",
    "coalesce",
    "cut_block",
    "cut_runs",
    "fetch_remote",
    "local_path",
    "read_options",
    "read_pieces",
    "read_samples",
    "remote_metadata",
    "shard_kind",
    "stream_samples",
]

#: Local shards: merge samples that touch or are less than a page apart. Bridging wider gaps buys
#: nothing on a local disk and reads far more bytes when tiles are small
#: (``benchmarks/streaming_io.py``, Harvey tiles at 85% pruning, shards with a pax header per
#: member as webdataset writes them, ~6.5 KB per sample: 0.150x of the shard bytes at 0-4 KiB,
#: 0.589x at 64 KiB).
DEFAULT_LOCAL_MAX_GAP = 4096
#: Remote shards: merge ranges less than a page apart, as for local files. Measured against nginx
#: on loopback (``benchmarks/remote_io.py --ratios 0.5 0.7 0.85 0.9 --delay 0 0.01 --gaps 4096
#: 16384``, Harvey samples of 4.4 KB, 20 MB/s per connection, 64 in flight): at 85% 4 KiB moves
#: 0.158x of the shard bytes (the selection is 0.150x) at 18.0x the stream, 7.5x with 10 ms added;
#: 16 KiB is faster (21.7x, 10.9x) but moves 0.239x. With ``concurrency`` ranges in flight a round
#: trip ``L`` costs ``L / concurrency``, so a gap ``g`` is worth bridging only when
#: ``g / bandwidth`` is smaller than that: on a high-latency store raise ``concurrency`` first (no
#: extra bytes), then ``remote_max_gap``.
DEFAULT_REMOTE_MAX_GAP = 4096
#: One run never spans more than this (unless a single sample is larger).
DEFAULT_MAX_BLOCK = 16 * 1024 * 1024


def shard_kind(shard: str) -> str:
    """``"local"`` (a path or ``file://``), ``"stream"`` (``pipe:``) or ``"remote"`` (a URL)."""
    if shard.startswith("pipe:"):
        return "stream"
    if shard.startswith("file:") or "://" not in shard:
        return "local"
    return "remote"


def local_path(shard: str) -> str:
    """The file path of a local shard (``file://x`` -> ``x``, as webdataset's ``__local_path__``)."""
    from urllib.parse import urlparse

    return urlparse(shard).path if shard.startswith("file:") else shard


@dataclass(frozen=True)
class ReadOptions:
    """How shards are read (see the module docstring of each stage).

    Attributes:
        max_gap: local shards: byte gap bridged by one ``pread`` (default 4 KiB).
        remote_max_gap: remote shards: byte gap bridged by one range request.
        max_block: the longest run in bytes.
        readahead: ``"planned"`` (no kernel readahead, ``WILLNEED`` for the planned runs),
            ``"direct"`` (``O_DIRECT``: exactly the bytes asked from the device, past the page
            cache; for corpora far larger than memory) or ``"kernel"``
            (:mod:`rsprune_data.reading.local`).
        prefetch: local runs announced ahead of the one being read.
        storage_options: fsspec options for remote shards (credentials, endpoint, ...).
        concurrency: remote ranges in flight per process (per DataLoader worker); up to twice
            that while ``PrunedWebDataset`` fetches the next read block.
        retry: retries of failed remote ranges.
    """

    max_gap: int = DEFAULT_LOCAL_MAX_GAP
    remote_max_gap: int = DEFAULT_REMOTE_MAX_GAP
    max_block: int = DEFAULT_MAX_BLOCK
    readahead: str = "planned"
    prefetch: int = 16
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    concurrency: int = DEFAULT_CONCURRENCY
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def __post_init__(self) -> None:
        check_int("max_gap", self.max_gap, 0)
        check_int("remote_max_gap", self.remote_max_gap, 0)
        check_int("max_block", self.max_block, 0)
        check_int("prefetch", self.prefetch, 0)
        check_int("concurrency", self.concurrency, 1)
        check_readahead(self.readahead)
        if not isinstance(self.retry, RetryPolicy):
            raise ConfigError(
                f"`retry` must be a RetryPolicy, got {self.retry!r}: e.g. "
                "ReadOptions(retry=RetryPolicy(attempts=5))"
            )
        if self.storage_options is not None and not isinstance(self.storage_options, Mapping):
            raise ConfigError(
                f"`storage_options` must be a dict of fsspec options, got "
                f"{self.storage_options!r}: e.g. {{'anon': True}}"
            )
        object.__setattr__(self, "storage_options", dict(self.storage_options or {}))

    def __hash__(self) -> int:  # storage_options is a dict
        return hash((self.max_gap, self.remote_max_gap, self.max_block, self.readahead))

    def runs(self, offsets: Sequence[int], lengths: Sequence[int], remote: bool) -> Runs:
        """The runs of ranges in file order."""
        return coalesce(
            np.asarray(offsets, np.int64),
            np.asarray(lengths, np.int64),
            max_gap=self.remote_max_gap if remote else self.max_gap,
            max_block=self.max_block,
        )

    def remote_file(self, url: str) -> RemoteFile:
        """A :class:`RemoteFile` for ``url`` with these options."""
        return RemoteFile(url, self.storage_options, concurrency=self.concurrency, retry=self.retry)


def read_options(read: object) -> ReadOptions:
    """``read=`` of the loaders: a :class:`ReadOptions`, or ``None`` for the defaults."""
    if read is None:
        return ReadOptions()
    if not isinstance(read, ReadOptions):
        raise ConfigError(
            f"`read` must be a ReadOptions, got {read!r}: e.g. "
            "read=ReadOptions(readahead='direct', concurrency=64)"
        )
    return read


def read_samples(
    shard: str,
    numbers: Sequence[int],
    offsets: Sequence[int],
    lengths: Sequence[int],
    keys: Sequence[str | None],
    options: ReadOptions,
    *,
    opened: LocalFile | None = None,
    sums: Sequence[int | None] | None = None,
) -> Iterator[Sample]:
    """The samples of one shard, in the order given (tar order: ascending ``offsets``).

    Args:
        shard: a path, ``file://`` URL, fsspec URL or ``pipe:`` command.
        numbers: each sample's number within the shard (``pipe:`` streams select by it).
        offsets, lengths: each sample's byte range (the index's ``offset``/``length``).
        keys: each sample's key in the index (``None`` where the index has none).
        options: the :class:`ReadOptions`.
        opened: a local shard's file already open (kept open; otherwise one is opened and closed).
        sums: each sample's checksum in the index (``None``: bytes not verified, keys still are).

    Yields:
        ``(key, {ext: bytes})``, checked against ``keys`` by :func:`check_sample`.
    """
    piece = Piece(shard, offsets, lengths, keys, sums, numbers)
    for item in read_pieces([piece], options, opened=None if opened is None else {0: opened})[0]:
        key, _ = item.pop("__key__"), item.pop("__url__")
        yield key, item


def fetch_remote(pieces: Sequence[Piece], options: ReadOptions) -> list[list[bytes]]:
    """The run buffers of several remote pieces, fetched through one shared window.

    With a piece per shard each read would wait for its own round trips; here the runs of every
    piece go out together, ``options.concurrency`` requests in flight in all (pieces on other
    filesystems, e.g. ``s3://`` beside ``https://``, in windows of their own), in batches of at
    most ``max_batch_bytes``, retried as one :class:`RemoteFile` retries. Nothing is cut here, so
    a loader may fetch the next read while it delivers one (:func:`read_pieces` cuts).

    Returns:
        One list of buffers per piece, one per run of ``options.runs`` of its ranges.
    """
    files = [options.remote_file(p.shard) for p in pieces]
    runs = [options.runs(p.offsets, p.lengths, True) for p in pieces]
    bufs: list[list[bytes]] = [[] for _ in pieces]
    groups: dict[int, list[int]] = {}
    for i, f in enumerate(files):
        groups.setdefault(id(f.fs), []).append(i)
    for members in groups.values():
        lead = files[members[0]]
        owners = [files[i] for i in members for _ in range(len(runs[i]))]
        which = [i for i in members for _ in range(len(runs[i]))]
        starts = [x for i in members for x in runs[i].start.tolist()]
        stops = [x for i in members for x in runs[i].stop.tolist()]
        for a, b in lead.batches(starts, stops):
            got = lead.fetch(starts[a:b], stops[a:b], others=owners[a:b])
            for i, buf in zip(which[a:b], got, strict=True):
                bufs[i].append(buf)
    return bufs


def read_pieces(
    pieces: Sequence[Piece],
    options: ReadOptions,
    *,
    opened: Mapping[int, LocalFile] | None = None,
    fetched: Mapping[int, list[bytes]] | None = None,
    local_paths: bool = False,
) -> list[list[Item]]:
    """The samples of one read (a loader's block or batch): every piece's, in its order, as
    webdataset dicts (``__key__``, ``__url__``: the shard, one ``bytes`` per member, and with
    ``local_paths`` a local shard's ``__local_path__``, as webdataset's own reader adds).

    ``pipe:`` pieces are streamed (:func:`stream_samples`). The runs of the other pieces land back
    to back in this thread's :mod:`~rsprune_data.reading.arena`: local runs read straight into it,
    remote runs (``fetched[k]`` for piece ``k`` where given, else fetched here through one window,
    :func:`fetch_remote`) copied in; then all their samples are cut with one array pass
    (:func:`cut_block`) and checked against their keys and checksums.

    Args:
        pieces: one per shard and read, offsets ascending within a piece.
        options: the :class:`ReadOptions`.
        opened: local files already open, by piece position (kept open; others are opened and
            closed here).
        fetched: run buffers of remote pieces already fetched (:func:`fetch_remote`), by position.

    Returns:
        One list of samples per piece.
    """
    kinds = [shard_kind(p.shard) for p in pieces]
    ranged = [k for k, kind in enumerate(kinds) if kind != "stream"]
    runs = {
        k: options.runs(pieces[k].offsets, pieces[k].lengths, kinds[k] == "remote") for k in ranged
    }
    bufs: dict[int, list[bytes]] = dict(fetched or {})
    remote = [k for k in ranged if kinds[k] == "remote" and k not in bufs]
    if remote:
        bufs.update(zip(remote, fetch_remote([pieces[k] for k in remote], options), strict=True))
    out: list[list[Item]] = [[] for _ in pieces]
    for k, kind in enumerate(kinds):
        if kind == "stream":
            p = pieces[k]
            out[k] = [
                {"__key__": key, "__url__": p.shard, **members}
                for key, members in stream_samples(p.shard, p.numbers, p.keys, p.offsets, p.sums)
            ]
    if not ranged:
        return out
    total = sum(runs[k].nbytes for k in ranged)
    arena = buffer(total)
    view = memoryview(arena)
    pos = []
    at = 0
    try:
        for k in ranged:
            r = runs[k]
            size = r.nbytes
            if kinds[k] == "remote":
                w = at
                for b in bufs[k]:
                    view[w : w + len(b)] = b
                    w += len(b)
            else:
                mine = None if opened is None else opened.get(k)
                if mine is not None:
                    mine.read_into(r, view[at : at + size])
                else:
                    p = pieces[k]
                    with LocalFile(
                        local_path(p.shard), readahead=options.readahead, prefetch=options.prefetch
                    ) as g:
                        g.read_into(r, view[at : at + size])
            pos.append(_positions(r, pieces[k].offsets, at))
            at += size
    finally:
        view.release()
    paths = [
        local_path(pieces[k].shard) if local_paths and kinds[k] == "local" else None for k in ranged
    ]
    cut = cut_block(
        arena, np.concatenate(pos).tolist(), [pieces[k] for k in ranged], local_paths=paths
    )
    for k, got in zip(ranged, cut, strict=True):
        out[k] = got
    return out


def _positions(runs: Runs, offsets: Sequence[int], at: int) -> NDArray[np.int64]:
    """Where each sample of a piece starts once its runs lie back to back from ``at``: its
    offset less the shift of its run (the run's start less where the run lands)."""
    sizes = runs.stop - runs.start
    shift = runs.start - (np.cumsum(sizes) - sizes + at)
    out: NDArray[np.int64] = np.asarray(offsets, np.int64) - np.repeat(shift, np.diff(runs.bounds))
    return out
