"""Cut samples out of the buffer of one run: no per-sample system call, one header walk per member.

Shape: ``(buffer of run [start, stop), sample offsets and lengths inside it, expected keys)`` ->
``(key, {ext: bytes})`` per sample, in the order given. The members of a sample are contiguous
(:class:`rsprune_data.tario.TarSample`), so each sample is walked from its own first header to its
own end; member data is sliced, never scanned. Plain ustar members (what ``tarfile``, GNU tar and
webdataset's ``TarWriter`` write for names under 100 bytes) take a fast path; anything else (GNU
long names, pax headers, name prefixes, metadata members, damage) goes through
:func:`rsprune_data.tario.parse_sample`, which handles every case and names the damage.

:func:`check_sample` is the one place where a sample's raw bytes, its key and its index row meet:
the key is compared with the index's, and where the index has a per-sample checksum
(:mod:`rsprune_data.integrity`) the raw bytes are hashed and compared with it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from ..errors import StaleIndexError
from ..integrity import check_sample as check_checksum
from ..integrity import digest as xxh3
from ..tario import parse_sample
from .runs import Runs

__all__ = ["check_sample", "cut_run", "cut_runs"]

Sample = tuple[str, dict[str, bytes]]


def check_sample(
    shard: str,
    offset: int,
    key: str,
    expected: str | None,
    members: dict[str, bytes],
    buf: bytes,
    start: int,
    stop: int,
    checksum: int | None = None,
) -> None:
    """Refuse a sample that is not the one its index row describes.

    Args:
        shard: the shard's path or URL, for the message.
        offset: the sample's byte offset in the shard (index row ``offset``).
        key: the key read from the sample's tar headers.
        expected: the index row's key (``None``: the index stores no keys).
        members: the sample's member bytes by extension.
        buf, start, stop: the sample's raw tar bytes are ``buf[start:stop]``.
        checksum: the index row's checksum of those bytes (``None``: not verified).

    Raises:
        StaleIndexError: the key differs (the shard changed since indexing).
        ChecksumError: the bytes differ from those indexed (a ``StaleIndexError`` too).
    """
    if checksum is not None:  # first: changed bytes may still parse, with the same key
        check_checksum(
            memoryview(buf)[start:stop],
            checksum,
            shard=shard,
            offset=offset,
            key=key if expected is None else expected,
        )
    if expected is not None and key != expected:
        raise StaleIndexError(
            f"shard {shard}: the sample at byte {offset} has key {key!r} but the index says "
            f"{expected!r}: the shard changed since indexing; run `rsprune-data index` again"
        )


_EXTS: dict[bytes, str] = {}  # member extensions seen, decoded once (a dataset has a handful)


def _ext(raw: bytes) -> str:
    ext = _EXTS.get(raw)
    if ext is None:
        ext = raw.decode("utf-8", "surrogateescape").lower()
        if len(_EXTS) < 4096:
            _EXTS[raw] = ext
    return ext


def _walk_sample(buf: bytes, p: int, end: int, shard: str, at: int) -> Sample:
    """Members of the sample in ``buf[p:end]``; ``at`` is ``p``'s offset in the shard.

    The fast path reads only what it needs from each header (type, name, size) and checks the
    structure instead of header checksums: every member is a plain file whose name carries one
    key, the members tile ``[p, end)`` exactly, and the caller compares the key with the index
    (:func:`check_sample`). Anything unusual goes to :func:`rsprune_data.tario.parse_sample`,
    which checks checksums and names the damage. Keys are compared as bytes and decoded once,
    extensions decoded once per distinct name: this walk runs once per delivered sample.
    """
    stem: bytes | None = None
    members: dict[str, bytes] = {}
    q = p
    try:
        while q < end:
            kind = buf[q + 156]
            if kind == 120:  # 'x': pax header; tarfile writes one per member for a float mtime
                size = int(buf[q + 124 : q + 135], 8)
                pax = buf[q + 512 : q + 512 + size]
                if b" path=" in pax or b" size=" in pax or b" GNU.sparse." in pax:
                    return _slow(buf, p, end, shard, at)
                q += 512 + ((size + 511) & ~511)
                kind = buf[q + 156]
            if (kind != 48 and kind != 0) or buf[q + 345] or buf[q] == 95:  # 95: '_' (__meta__)
                return _slow(buf, p, end, shard, at)
            size = int(buf[q + 124 : q + 135], 8)
            nul = buf.find(b"\0", q, q + 100)
            name = buf[q : q + 100 if nul < 0 else nul]
            slash = name.rfind(b"/") + 1
            dot = name.find(b".", slash)
            if dot <= slash or name[-1] == 47:  # 47: '/', an old-style directory
                return _slow(buf, p, end, shard, at)
            if stem is None:
                stem = name[:dot]
            elif name[:dot] != stem:
                return _slow(buf, p, end, shard, at)  # raises the precise error
            ext = _ext(name[dot + 1 :])
            data = q + 512
            q = data + ((size + 511) & ~511)
            if ext in members or data + size > end:
                return _slow(buf, p, end, shard, at)
            members[ext] = buf[data : data + size]
    except (ValueError, IndexError):  # a non-octal size, a header past the buffer
        return _slow(buf, p, end, shard, at)
    if stem is None or q != end:
        return _slow(buf, p, end, shard, at)
    return stem.decode("utf-8", "surrogateescape"), members


def _slow(buf: bytes, p: int, end: int, shard: str, at: int) -> Sample:
    return parse_sample(buf[p:end], at, shard=shard)


def cut_run(
    buf: bytes,
    base: int,
    offsets: Sequence[int],
    lengths: Sequence[int],
    keys: Sequence[str | None],
    shard: str,
    sums: Sequence[int | None] | None = None,
) -> Iterator[Sample]:
    """The samples of one run buffer.

    Args:
        buf: the bytes of the run, starting at shard byte ``base``.
        offsets, lengths: the samples' byte ranges in the shard (inside the run).
        keys: the index's key for each sample (``None`` where unknown).
        shard: path or URL for messages.
        sums: the index's checksum for each sample (``None``, or ``None`` entries: not verified).

    Yields:
        ``(key, {ext: bytes})`` per sample, in the order given.

    Raises:
        ShardError: a range does not hold one complete sample.
        StaleIndexError: a key differs from the index's.
    """
    yield from _cut([buf], [base], [0, len(offsets)], offsets, lengths, keys, shard, sums)


def cut_runs(
    buffers: Iterable[bytes],
    runs: Runs,
    offsets: Sequence[int],
    lengths: Sequence[int],
    keys: Sequence[str | None],
    shard: str,
    sums: Sequence[int | None] | None = None,
) -> Iterator[Sample]:
    """:func:`cut_run` over the buffers of ``runs`` (one buffer per run, in run order)."""
    yield from _cut(
        buffers, runs.start.tolist(), runs.bounds.tolist(), offsets, lengths, keys, shard, sums
    )


def _cut(
    buffers: Iterable[bytes],
    starts: Sequence[int],
    bounds: Sequence[int],
    offsets: Sequence[int],
    lengths: Sequence[int],
    keys: Sequence[str | None],
    shard: str,
    sums: Sequence[int | None] | None,
) -> Iterator[Sample]:
    """One loop over every sample of every run (no generator per run: this is the hot path).

    The cheap comparisons are made here; a mismatch goes to :func:`check_sample`, which raises
    the error that names it (the one home of what a mismatch means).
    """
    walk = _walk_sample
    i = 0
    for r, buf in enumerate(buffers):
        base, stop = starts[r], bounds[r + 1]
        view = memoryview(buf) if sums is not None else None
        while i < stop:
            o, n, want = offsets[i], lengths[i], keys[i]
            p = o - base
            want_sum = None if sums is None else sums[i]
            # before parsing: damaged bytes fail as changed, by name
            if want_sum is not None and view is not None and xxh3(view[p : p + n]) != want_sum:
                check_checksum(
                    view[p : p + n],
                    want_sum,
                    shard=shard,
                    offset=o,
                    key=want if want is not None else f"#{o}",
                )
            key, members = walk(buf, p, p + n, shard, o)
            if want is not None and key != want:
                check_sample(shard, o, key, want, members, buf, p, p + n)
            i += 1
            yield key, members
