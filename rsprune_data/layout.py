"""Member layout: where each member's bytes lie inside its sample, as the index records it.

The indexer parses every sample's tar headers anyway (:class:`rsprune_data.tario.TarSample`); it
keeps what it found, so the loaders can cut a sample whose checksum they have verified without
reading its headers again. A sample's layout is a function of its bytes alone, so bytes that hash
to the indexed ``xxh3_64`` have exactly the indexed layout; the loaders use it only then (and walk
the headers when ``verify=False`` or the shard has no checksums).

Four tensors in the index file, present together, in CSR form over the samples in tar order:
``member_bounds`` (int64, ``[n + 1]``): sample ``i`` has members ``bounds[i]:bounds[i + 1]``, in
tar order; ``member_start`` (int64) each member's first data byte relative to its sample's offset;
``member_size`` (int64) its size; ``member_ext`` (uint16) its extension as a position in the JSON
list of the ``member_exts`` metadata (webdataset's lower-cased extension: the dict key). Pure numpy.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from . import index_check as check

__all__ = [
    "DIGEST_KEY",
    "EXTS_KEY",
    "MEMBER_TENSORS",
    "MemberLayout",
    "Members",
    "check_members",
    "encode_members",
    "layout_digest",
    "layout_of",
]

MEMBER_TENSORS: dict[str, type[np.generic]] = {
    "member_bounds": np.int64,
    "member_start": np.int64,
    "member_size": np.int64,
    "member_ext": np.uint16,
}
#: The metadata entry naming the extensions ``member_ext`` points into (a JSON list of str).
EXTS_KEY = "member_exts"
#: The metadata entry holding :func:`layout_digest` (written by ``index.write_index``).
DIGEST_KEY = "member_digest"
_MAX_EXTS = int(np.iinfo(np.uint16).max) + 1


def encode_members(
    members: Sequence[Mapping[str, tuple[int, int]] | None], offsets: Sequence[int]
) -> tuple[dict[str, NDArray[np.generic]], str] | None:
    """The layout tensors and the ``member_exts`` entry of samples in tar order.

    Args:
        members: per sample, extension -> ``(data offset in the shard, size)``, in tar order
            (:attr:`rsprune_data.tario.TarSample.members`).
        offsets: per sample, its offset in the shard.

    Returns:
        ``(tensors, member_exts)``, or ``None`` when a sample's layout is unknown (``None``)
        or the samples use more distinct extensions than ``member_ext`` can name (the index is
        then written without a layout).
    """
    exts: dict[str, int] = {}
    counts, starts, sizes, ids = [], [], [], []
    for m, base in zip(members, offsets, strict=True):
        if m is None:
            return None
        counts.append(len(m))
        for ext, (data, size) in m.items():
            ids.append(exts.setdefault(ext, len(exts)))
            starts.append(data - base)
            sizes.append(size)
    if len(exts) > _MAX_EXTS:
        return None
    tensors: dict[str, NDArray[np.generic]] = {
        "member_bounds": np.concatenate(([0], np.cumsum(counts, dtype=np.int64))).astype(np.int64),
        "member_start": np.asarray(starts, np.int64),
        "member_size": np.asarray(sizes, np.int64),
        "member_ext": np.asarray(ids, np.uint16),
    }
    return tensors, json.dumps(list(exts))


def layout_digest(tensors: Mapping[str, NDArray[Any]], exts: str, checksums: NDArray[Any]) -> str:
    """``xxh3_64`` of the layout tensors, the extensions and the samples' checksums: a layout
    changed in the file (a flipped bit, a hand edit) no longer matches the checksums it was
    written with."""
    import xxhash

    h = xxhash.xxh3_64()
    for name in MEMBER_TENSORS:
        h.update(np.ascontiguousarray(tensors[name]).tobytes())
    h.update(exts.encode())
    h.update(np.ascontiguousarray(checksums, np.uint64).tobytes())
    return h.hexdigest()


def check_members(
    tensors: Mapping[str, NDArray[Any]],
    meta: Mapping[str, str],
    lengths: NDArray[Any],
    path: object,
    checksums: NDArray[Any] | None = None,
) -> list[str]:
    """Refuse a layout that does not fit its samples; returns the extensions.

    As tar lays members out: every member's data starts on a 512-byte block after its header
    (``start`` a multiple of 512, ``>= 512``), the next member's data starts at least one header
    after this one's padded end, the last member's padded end is the sample's end; ``member_ext``
    names distinct extensions of ``member_exts`` (itself without repeats) within a sample, and
    ``member_bounds`` runs from 0 to the member count. With ``checksums``, the
    ``member_digest`` metadata must match (:func:`layout_digest`).

    Raises:
        IndexCorruptError: naming the field.
    """
    n = int(lengths.shape[0])
    exts = _exts(meta.get(EXTS_KEY), path)
    if len(set(exts)) < len(exts):
        raise check.corrupt(path, EXTS_KEY, "names an extension twice")
    if checksums is not None and meta.get(DIGEST_KEY) != layout_digest(
        tensors, meta.get(EXTS_KEY, ""), checksums
    ):
        raise check.corrupt(
            path, DIGEST_KEY, "does not match the member layout and checksums of the file"
        )
    bounds = tensors["member_bounds"]
    check.check_tensor("member_bounds", bounds, np.int64, (n + 1,), path)
    m = int(bounds[-1]) if n + 1 == bounds.shape[0] else 0
    for name in ("member_start", "member_size", "member_ext"):
        check.check_tensor(name, tensors[name], MEMBER_TENSORS[name], (m,), path)
    if bounds[0] != 0 or (np.diff(bounds) < 0).any():
        raise check.corrupt(path, "member_bounds", "must rise from 0 to the member count")
    start, size = tensors["member_start"], tensors["member_size"]
    counts = np.diff(bounds)
    sample = np.repeat(np.arange(n), counts)
    end = start + size
    padded = (end + 511) // 512 * 512
    if (start < 512).any() or (start % 512).any() or (size < 0).any():
        raise check.corrupt(path, "member_start", "puts a member's data off a tar block")
    if (end > lengths[sample]).any():
        raise check.corrupt(path, "member_start", "puts a member outside its sample")
    follows = sample[1:] == sample[:-1]
    if (start[1:][follows] < padded[:-1][follows] + 512).any():
        raise check.corrupt(path, "member_start", "has members of one sample overlapping")
    last = bounds[1:][counts > 0] - 1
    if (padded[last] != lengths[counts > 0]).any():
        raise check.corrupt(path, "member_size", "does not end the sample with its last member")
    ext = tensors["member_ext"]
    if m and int(ext.max()) >= len(exts):
        raise check.corrupt(path, "member_ext", f"points past the {len(exts)} member_exts")
    if m:
        order = np.lexsort((ext, sample))
        if ((sample[order][1:] == sample[order][:-1]) & (np.diff(ext[order]) == 0)).any():
            raise check.corrupt(path, "member_ext", "names one extension twice in a sample")
    return exts


def _exts(raw: str | None, path: object) -> list[str]:
    try:
        exts = json.loads(raw or "")
    except ValueError:
        exts = None
    if not isinstance(exts, list) or not all(isinstance(e, str) and e for e in exts):
        raise check.corrupt(path, EXTS_KEY, f"must be a JSON list of extensions, got {raw!r}")
    return exts


@dataclass(frozen=True)
class Members:
    """The members of some samples of one shard, ready for the cut: sample ``i`` (of the
    samples asked) has ``cuts[bounds[i]:bounds[i + 1]]``, each ``(extension, start, stop)``
    relative to the sample's first byte."""

    bounds: list[int]
    cuts: list[tuple[str, int, int]]


class MemberLayout:
    """The layout of one shard's samples (module docstring), checked (:func:`check_members`).

    Shards nearly always repeat one layout (the same extensions in the same order in every
    sample); that case is noticed once here, so :meth:`take` gathers only the positions, and only
    those are kept: 8 bytes per member (int32 start and stop; int64 for samples over 2 GiB).
    """

    def __init__(
        self,
        bounds: NDArray[np.int64],
        start: NDArray[np.int64],
        size: NDArray[np.int64],
        ext: NDArray[np.uint16],
        exts: list[str],
    ) -> None:
        stop = start + size
        narrow = not stop.size or int(stop.max()) < 2**31  # offsets inside a sample: nearly always
        kind = np.int32 if narrow else np.int64
        self.start, self.stop = start.astype(kind), stop.astype(kind)
        self.exts = exts
        n = int(bounds.shape[0]) - 1
        counts = np.diff(bounds)
        #: members per sample where every sample has the same ones in the same order, else 0
        self.repeat = 0
        self.pattern: list[str] = []
        if n and int(counts.min()) == int(counts.max()) > 0:
            c = int(counts[0])
            rows = ext.reshape(n, c)
            if (rows == rows[0]).all():
                self.repeat, self.pattern = c, [exts[e] for e in rows[0].tolist()]
        # a repeated layout needs neither the bounds nor the extension of every member
        self.bounds = bounds if not self.repeat else np.zeros(0, np.int64)
        self.ext = ext if not self.repeat else np.zeros(0, np.uint16)

    @property
    def nbytes(self) -> int:
        """Memory held (per worker, for the shards it has read)."""
        return sum(a.nbytes for a in (self.start, self.stop, self.bounds, self.ext))

    def take(self, numbers: NDArray[np.int64]) -> Members:
        """The members of samples ``numbers`` (their numbers in the shard)."""
        n = int(numbers.shape[0])
        c = self.repeat
        if c:
            rows = (numbers[:, None] * c + np.arange(c)).ravel()
            names = self.pattern * n
            bounds = list(range(0, (n + 1) * c, c))
        else:
            lo, hi = self.bounds[numbers], self.bounds[numbers + 1]
            counts = hi - lo
            ends = np.cumsum(counts)
            rows = np.repeat(lo - (ends - counts), counts) + np.arange(int(ends[-1]) if n else 0)
            names = list(map(self.exts.__getitem__, self.ext[rows].tolist()))
            bounds = [0, *ends.tolist()]
        cuts = list(zip(names, self.start[rows].tolist(), self.stop[rows].tolist(), strict=True))
        return Members(bounds, cuts)


def layout_of(
    arrays: Mapping[str, NDArray[Any]],
    meta: Mapping[str, str],
    path: object,
    *,
    checked: bool = False,
) -> MemberLayout | None:
    """The layout in the tensors of one index file as :func:`rsprune_data.index.read_index`
    returns them (``None`` if it has none); ``checked``: ``read_index`` has already checked it
    (:func:`check_members`), so it is not checked twice."""
    if EXTS_KEY not in meta:
        return None
    if checked:
        exts = _exts(meta[EXTS_KEY], path)
    else:
        sums = arrays.get("checksum")
        if sums is None:
            sums = np.zeros(int(arrays["length"].shape[0]), np.uint64)
        exts = check_members(arrays, meta, arrays["length"], path, sums)
    return MemberLayout(
        arrays["member_bounds"],
        arrays["member_start"],
        arrays["member_size"],
        arrays["member_ext"],
        exts,
    )
