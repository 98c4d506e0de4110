"""Cut samples out of the bytes of a read: no per-sample system call, no member data scanned.

Shape: ``(buffer, where each sample starts in it, Pieces: shard, offsets, lengths, expected keys
and checksums)`` -> one webdataset dict per sample (:func:`cut_block`), in the order given. The
members of a sample are contiguous (:class:`rsprune_data.tario.TarSample`), so each sample is
walked from its own first header to its own end. Three walks, cheapest first: a sample that
repeats the previous sample's member layout is checked by prefix (:func:`_walk_known`); plain
ustar members (what ``tarfile``, GNU tar and webdataset's ``TarWriter`` write for names under
100 bytes) are split as webdataset does (:func:`_walk_fast`); anything else (GNU long names, pax
paths, name prefixes, metadata members, damage) goes through
:func:`rsprune_data.tario.parse_sample`, which handles every case and names the damage.
:func:`cut_run` and :func:`cut_runs` are the same cut for a run buffer or a list of them.

:func:`check_sample` is the one place where a mismatch between a sample's bytes, its key and
its index row is named: the checksum is compared first (where the index has one,
:mod:`rsprune_data.integrity`), then the key.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

from ..errors import StaleIndexError
from ..integrity import check_sample as check_checksum
from ..integrity import digest as xxh3
from ..layout import Members
from ..tario import parse_sample
from .runs import Runs

__all__ = ["Item", "Piece", "check_sample", "cut_block", "cut_run", "cut_runs", "plain_keys"]

Sample = tuple[str, dict[str, bytes]]
#: A webdataset sample: ``__key__``, ``__url__``, one ``bytes`` per member[, ``__local_path__``].
Item = dict[str, Any]


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


def _harmless_pax(buf: bytes | bytearray, a: int, size: int) -> bool:
    """Whether the pax records at ``buf[a:a + size]`` leave the member's name and size alone
    (webdataset's ``TarWriter`` writes one per member for its float ``mtime``)."""
    return all(buf.find(word, a, a + size) < 0 for word in (b" path=", b" size=", b" GNU.sparse."))


def _past_pax(buf: bytes | bytearray, q: int) -> int:
    """Where the member header after the pax header at ``q`` starts, or -1 when its records
    change the member's name or size (the full walk handles those). A non-octal size raises
    ``ValueError``, as the walks' own size reads do."""
    size = int(buf[q + 124 : q + 135], 8)
    return q + 512 + ((size + 511) & ~511) if _harmless_pax(buf, q + 512, size) else -1


class Template:
    """A sample's member layout for :func:`_walk_known`: per member, in tar order, the name
    after the key with the name field's NUL (``b".jpg\\0"``) and the extension; ``longest``
    is the longest of those names without the NUL."""

    __slots__ = ("longest", "members")

    def __init__(self, names: list[tuple[bytes, str]]) -> None:
        self.members = [(dotted + b"\0", ext) for dotted, ext in names]
        self.longest = max((len(dotted) for dotted, _ in names), default=0)


def _walk_fast(
    buf: bytes, p: int, end: int, names: list[tuple[bytes, str]] | None
) -> Sample | None:
    """The sample in ``buf[p:end]`` if its members are plain, else ``None``.

    Reads only what it needs from each header (type, name, size) and checks the structure
    instead of header checksums: every member is a plain file whose name carries one key, the
    members tile ``[p, end)`` exactly, and the caller compares the key with the index
    (:func:`check_sample`). Keys are compared as bytes and decoded once, extensions decoded once
    per distinct name. ``names``, where given, receives each member's name after the key and
    its extension (what a :class:`Template` for :func:`_walk_known` is made of).
    """
    stem: bytes | None = None
    members: dict[str, bytes] = {}
    q = p
    try:
        while q < end:
            kind = buf[q + 156]
            if kind == 120:  # 'x': pax header; tarfile writes one per member for a float mtime
                q = _past_pax(buf, q)
                if q < 0:
                    return None
                kind = buf[q + 156]
            if (kind != 48 and kind != 0) or buf[q + 345] or buf[q] == 95:  # 95: '_' (__meta__)
                return None
            size = int(buf[q + 124 : q + 135], 8)
            nul = buf.find(b"\0", q, q + 100)
            name = buf[q : q + 100 if nul < 0 else nul]
            slash = name.rfind(b"/") + 1
            dot = name.find(b".", slash)
            if dot <= slash or name[-1] == 47:  # 47: '/', an old-style directory
                return None
            if stem is None:
                stem = name[:dot]
            elif name[:dot] != stem:
                return None  # the slow path raises the precise error
            ext = _ext(name[dot + 1 :])
            data = q + 512
            q = data + ((size + 511) & ~511)
            if ext in members or data + size > end:
                return None
            members[ext] = buf[data : data + size]
            if names is not None:
                names.append((name[dot:], ext))
    except (ValueError, IndexError):  # a non-octal size, a header past the buffer
        return None
    if stem is None or q != end:
        return None
    return stem.decode("utf-8", "surrogateescape"), members


def _walk_known(
    buf: bytes | bytearray,
    view: memoryview,
    p: int,
    end: int,
    key: bytes,
    names: Template,
    item: dict[str, Any],
) -> bool:
    """Whether the members of the sample in ``buf[p:end]`` are exactly ``key`` + each name of
    ``names`` (the previous sample's members, :func:`_walk_fast`); if so they are in ``item``
    (if not, ``item`` may hold some of them: discard it).

    Samples of a shard nearly always repeat one member layout, so checking that each header
    names what is expected costs two ``startswith`` per member (the key, then the extension with
    the name field's NUL) instead of splitting the name. The caller ensures ``key`` is one
    webdataset's split would give (:func:`plain_keys`), so the name splits into exactly ``key``
    and the extension. A name of 100 bytes or more (no NUL in the field, or no room) is left to
    the full walk. Member data is copied out of ``view`` (``buf`` may be a reused buffer).
    """
    at = len(key)
    if at + names.longest >= 100:
        return False
    q = p
    try:
        for dotted, ext in names.members:
            kind = buf[q + 156]
            if kind == 120:  # 'x': a pax header, as in _walk_fast
                q = _past_pax(buf, q)
                if q < 0:
                    return False
                kind = buf[q + 156]
            if (
                kind not in _PLAIN
                or buf[q + 345]
                or not buf.startswith(key, q)
                or not buf.startswith(dotted, q + at)
            ):
                return False
            size = int(buf[q + 124 : q + 135], 8)
            data = q + 512
            q = data + ((size + 511) & ~511)
            if q > end:
                return False
            item[ext] = view[data : data + size].tobytes()
    except (ValueError, IndexError):
        return False
    return q == end


def _first_header(buf: bytes | bytearray, p: int, h: int) -> bool:
    """Whether the sample at ``p`` opens with the ustar header at ``h`` of its first member:
    ``h == p``, or one pax header that leaves name and size alone lies between (what
    webdataset's ``TarWriter`` writes for a float mtime)."""
    try:
        return h == p or (buf[p + 156] == 120 and _past_pax(buf, p) == h)  # 120: 'x'
    except ValueError:
        return False


_PLAIN = b"0\0"  # the type flags of a regular file ('0', and NUL from old tars)


def plain_keys(keys: Sequence[str | None]) -> bool:
    """Whether every key is known and is what webdataset's split of its member names gives
    back: a non-empty basename without a dot, no leading underscore (webdataset's ``__meta__``
    rule). The condition of :func:`_walk_known`, checked over all keys at once."""
    return _plain_encoded(keys) is not None


def _plain_encoded(keys: Sequence[str | None]) -> list[bytes] | None:
    """The keys encoded (as tar names hold them) if :func:`plain_keys`, else ``None``."""
    if not keys or None in keys:
        return None
    joined = "\0".join(keys).encode("utf-8", "surrogateescape")  # type: ignore[arg-type]
    if (
        not joined
        or joined[:1] in (b"_", b"\0")
        or joined[-1:] in (b"/", b"\0")
        or b"\0_" in joined
        or b"\0\0" in joined
        or b"/\0" in joined
    ):
        return None
    split = joined.split(b"\0")
    if b"." not in joined:  # the common case: no dots at all
        return split
    return split if all(b"." not in k[k.rfind(b"/") + 1 :] for k in split) else None


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
    piece = Piece(shard, offsets, lengths, keys, sums)
    for item in cut_block(buf, [o - base for o in offsets], [piece])[0]:
        key, _ = item.pop("__key__"), item.pop("__url__")
        yield key, item


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
    bufs = list(buffers)
    placed, at = [], 0
    for b in bufs:
        placed.append(at)
        at += len(b)
    starts, bounds = runs.start.tolist(), runs.bounds.tolist()
    pos = [
        placed[r] + o - starts[r]
        for r in range(len(bufs))
        for o in offsets[bounds[r] : bounds[r + 1]]
    ]
    piece = Piece(shard, offsets, lengths, keys, sums)
    for item in cut_block(b"".join(bufs), pos, [piece])[0]:
        key, _ = item.pop("__key__"), item.pop("__url__")
        yield key, item


@dataclass(frozen=True)
class Piece:
    """The samples of one shard that one read wants (the arguments of :func:`read_samples`).

    ``numbers`` (each sample's number in its shard) is needed only by ``pipe:`` streams.
    """

    shard: str
    offsets: Sequence[int]
    lengths: Sequence[int]
    keys: Sequence[str | None]
    sums: Sequence[int | None] | None = None
    numbers: Sequence[int] = ()
    #: the samples' member layout from the index (:mod:`rsprune_data.layout`), used for the
    #: samples whose checksum is verified
    members: Members | None = None


def cut_block(
    buf: bytes | bytearray,
    pos: Sequence[int],
    pieces: Sequence[Piece],
    *,
    local_paths: Sequence[str | None] | None = None,
) -> list[list[Item]]:
    """The samples of several pieces whose bytes are in one buffer, as webdataset dicts.

    Args:
        buf: the read's bytes (typically this thread's :mod:`~rsprune_data.reading.arena`).
        pos: where each sample starts in ``buf``, the pieces' samples in turn.
        pieces: the pieces, in the order of ``pos``: shard name, shard offsets, lengths,
            expected keys and checksums of their samples.
        local_paths: per piece, the ``__local_path__`` to add (``None``: none).

    Returns:
        One list per piece, in its order, of ``{"__key__", "__url__", <ext>: bytes, ...,
        ["__local_path__"]}`` (the shard as ``__url__``); every member is a new ``bytes``
        (nothing refers to ``buf`` afterwards).

    Raises:
        ShardError, StaleIndexError, ChecksumError: as :func:`cut_runs`.

    A sample whose members repeat the previous sample's layout, in a piece whose index keys
    are all plain (:func:`plain_keys`), is checked and cut by :func:`_walk_known`; the others
    (the first of a read, a new layout, an unusual header) by :func:`_walk_fast`, or
    :func:`rsprune_data.tario.parse_sample`, which names any damage.
    """
    view = memoryview(buf)
    out: list[list[Item]] = []
    names: Template | None = None
    at = 0
    try:
        for k, piece in enumerate(pieces):
            got: list[Item] = []
            shard = piece.shard
            path = None if local_paths is None else local_paths[k]
            count = len(piece.offsets)
            sums = piece.sums if piece.sums is not None else [None] * count
            raw_keys = _plain_encoded(piece.keys)
            plain = raw_keys is not None
            given = piece.members
            cuts = given.cuts if given is not None else []
            bounds = given.bounds if given is not None else [0] * (count + 1)
            known = given is not None and raw_keys is not None
            for o, size, want, raw_key, want_sum, p, (first, last) in zip(
                piece.offsets,
                piece.lengths,
                piece.keys,
                raw_keys if raw_keys is not None else [b""] * count,
                sums,
                pos[at : at + count],
                pairwise(bounds),
                strict=True,
            ):
                if want_sum is not None and xxh3(view[p : p + size]) != want_sum:
                    check_checksum(  # before parsing: damaged bytes fail as changed, by name
                        view[p : p + size],
                        want_sum,
                        shard=shard,
                        offset=o,
                        key=want if want is not None else f"#{o}",
                    )
                item: Item = {"__key__": want, "__url__": shard}
                if (
                    known
                    and want_sum is not None
                    and first < last
                    and (n := len(raw_key)) < 99
                    and ((h := p + cuts[first][1] - 512) == p or _first_header(buf, p, h))
                    and buf.startswith(raw_key, h)
                    and buf[h + n] == 46  # '.'
                    and buf.find(b"/", h + n, h + 100) < 0
                    and not buf[h + 345]  # no ustar prefix: the name field is the whole name
                ):
                    # verified: these are the indexed bytes, so the indexed layout holds; and the
                    # first header names exactly the index's key (key, '.', an extension without
                    # '/'), so a key column shifted against the ranges is caught by the walk below
                    for ext, a, b in cuts[first:last]:
                        item[ext] = view[p + a : p + b].tobytes()
                elif not (
                    plain
                    and names is not None
                    and _walk_known(buf, view, p, p + size, raw_key, names, item)
                ):
                    raw = bytes(view[p : p + size])
                    layout: list[tuple[bytes, str]] = []
                    fast = _walk_fast(raw, 0, size, layout)
                    names = None if fast is None else Template(layout)
                    if fast is None:
                        fast = _slow(raw, 0, size, shard, o)
                    key, members = fast
                    if want is not None and key != want:
                        check_sample(shard, o, key, want, members, raw, 0, size)
                    item = {"__key__": key, "__url__": shard}
                    item.update(members)
                if path is not None:
                    item["__local_path__"] = path
                got.append(item)
            out.append(got)
            at += count
    finally:
        view.release()
    if at != len(pos):
        raise ValueError(f"cut_block: {len(pos)} positions for {at} samples")
    return out
