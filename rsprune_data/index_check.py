"""Validation of index files as they are read: nothing in a file on disk is trusted.

A damaged, hand-edited or foreign ``.rsidx.safetensors`` file must fail at load time with one
:class:`~rsprune_data.errors.IndexCorruptError` that names the file, the field and the fix, instead
of a raw numpy error later, a ``KeyError``, a ``JSONDecodeError``, or (worse) a wrong selection or a
read of the wrong bytes. The checks are pure functions of arrays and strings (numpy only), called by
:mod:`rsprune_data.index` when a file is read; each is O(n) vectorised numpy, a few ms per million
samples (``benchmarks/index_load.py`` measures ``PruneIndex.load`` with them).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .errors import IndexCorruptError

#: Upper bound of the Stage I entropy in bits (256 grey levels), with room for float32 rounding.
MAX_ENTROPY = 8.0 + 1e-4
#: Cosine similarities may exceed 1 by float32 rounding of normalised vectors.
MAX_ABS_SIMILARITY = 1.0 + 1e-3
#: ``reason`` is a uint8 code: 0 = ok, c = reasons[c - 1].
MAX_REASONS = 255

_FIX = "delete it and run `rsprune-data index` on its shard again"
# metadata fields that must hold a non-negative (or any, for mtimes) decimal integer
_INT_FIELDS = {"num_samples": 0, "shard_size": 0, "num_clusters": 0}


def corrupt(path: object, field: str, problem: str, fix: str = _FIX) -> IndexCorruptError:
    """The one error of a bad index file: ``index PATH: field FIELD PROBLEM: FIX``."""
    return IndexCorruptError(
        f"index {path} is corrupt: field {field!r} {problem}; {fix}", field, problem
    )


def _int_field(meta: Mapping[str, str], name: str, path: object, minimum: int | None) -> int:
    raw = meta[name]
    try:
        value = int(raw, 10)
    except ValueError:
        raise corrupt(path, name, f"must be a decimal integer, got {raw!r}") from None
    if minimum is not None and value < minimum:
        raise corrupt(path, name, f"must be >= {minimum}, got {value}")
    return value


def check_metadata(
    meta: Mapping[str, Any] | None, required: tuple[str, ...], path: object
) -> dict[str, str]:
    """The metadata as a ``dict[str, str]`` after checking that every ``required`` field is a
    string and that the numeric and JSON fields parse (``format`` and ``version`` are checked by
    the caller, which gives a version mismatch its own error)."""
    meta = dict(meta or {})
    missing = [k for k in required if not isinstance(meta.get(k), str)]
    if missing:
        raise corrupt(path, missing[0], f"is missing or not a string (all missing: {missing})")
    for name, minimum in _INT_FIELDS.items():
        _int_field(meta, name, path, minimum)
    _int_field(meta, "shard_mtime_ns", path, None)
    parse_reasons(meta, path)
    return meta


def parse_reasons(meta: Mapping[str, str], path: object) -> list[str]:
    """The ``reasons`` metadata: a JSON list of distinct, non-empty strings (at most 255)."""
    raw = meta["reasons"]
    try:
        reasons = json.loads(raw)
    except ValueError:
        raise corrupt(path, "reasons", f"is not JSON, got {raw[:80]!r}") from None
    if not isinstance(reasons, list) or not all(isinstance(r, str) and r for r in reasons):
        raise corrupt(
            path, "reasons", f"must be a JSON list of non-empty strings, got {raw[:80]!r}"
        )
    if len(set(reasons)) != len(reasons) or len(reasons) > MAX_REASONS:
        raise corrupt(
            path,
            "reasons",
            f"must hold at most {MAX_REASONS} distinct names, got "
            f"{len(reasons)} with {len(reasons) - len(set(reasons))} repeated",
        )
    return reasons


def check_tensor(
    name: str, value: NDArray[Any], dtype: type[np.generic], shape: tuple[int, ...], path: object
) -> None:
    """``value`` has exactly ``dtype`` (no silent cast of a float64 or int32 column) and ``shape``."""
    if value.dtype != np.dtype(dtype):
        raise corrupt(
            path, name, f"has dtype {value.dtype}, the format stores {np.dtype(dtype).name}"
        )
    if value.shape != shape:
        raise corrupt(
            path,
            name,
            f"has shape {value.shape}, expected {shape} "
            "(one value per sample, num_samples from the metadata)",
        )


class Shards:
    """Where the samples of a joined column come from: ``paths[s]`` holds positions
    ``starts[s]:starts[s + 1]``; per-shard limits (``shard_sizes``, ``num_reasons``) beside them.

    Value checks run once over the joined columns of all shards (a few numpy passes over N
    values) instead of once per file: per-file calls cost ~0.5 ms each in overhead alone, which
    at 1,000 shards would double ``PruneIndex.load``.
    """

    def __init__(
        self,
        paths: list[object],
        starts: NDArray[np.int64],
        shard_sizes: list[int],
        num_reasons: list[int],
    ) -> None:
        self.paths, self.starts = paths, starts
        self.shard_sizes = np.asarray(shard_sizes, np.int64)
        self.num_reasons = np.asarray(num_reasons, np.int64)

    @classmethod
    def one(cls, path: object, n: int, meta: Mapping[str, str]) -> Shards:
        """The single file ``path`` of ``n`` samples and metadata ``meta``."""
        return cls(
            [path],
            np.array([0, n], np.int64),
            [int(meta["shard_size"])],
            [len(parse_reasons(meta, path))],
        )

    @property
    def counts(self) -> NDArray[np.int64]:
        return np.diff(self.starts)

    def fail(self, name: str, bad: NDArray[np.bool_], col: NDArray[Any], rule: str) -> None:
        """Raise for the first ``True`` of ``bad``, naming its file and its sample in that file."""
        if not bad.any():
            return
        i = int(np.argmax(bad))
        s = int(np.searchsorted(self.starts, i, side="right")) - 1
        raise corrupt(
            self.paths[s],
            name,
            f"must be {rule}, sample {i - int(self.starts[s])} has {col[i].item()!r} "
            f"({int(bad.sum())} sample(s) out of range)",
        )


def check_values(cols: Mapping[str, NDArray[Any]], meta: Mapping[str, str], path: object) -> None:
    """:func:`check_columns` of one file's columns."""
    n = next((len(v) for k, v in cols.items() if k not in ("key_bytes", "key_offsets")), 0)
    check_columns(cols, int(meta["num_clusters"]), Shards.one(path, n, meta))


def check_columns(cols: Mapping[str, NDArray[Any]], num_clusters: int, shards: Shards) -> None:
    """Value ranges of the core columns present in ``cols`` (dtypes and lengths already checked),
    over the samples of one or many files joined in ``shards`` order.

    ``entropy`` finite in [0, 8] bits, ``nodata`` in [0, 1], ``similarity`` finite in [-1, 1],
    ``cluster_id`` in [-1, num_clusters), ``valid`` in {0, 1}, ``reason`` a code of its file's
    ``reasons`` list (codes as stored in the file) with ``valid == (reason == 0)``, and byte ranges
    inside the shard: ``offset >= 0``, ``length > 0``, each sample starting at or after the end of
    the previous one of its shard (tar order), the last ending by ``shard_size``.
    """
    fail = shards.fail
    # Fast path: one min and one max per column (NaN fails both comparisons, so it falls through
    # to the mask that names the sample); the masks are built only for a column that fails.
    with np.errstate(invalid="ignore"):
        for name, lo, hi, rule in (
            ("entropy", 0.0, MAX_ENTROPY, "finite in [0, 8] bits"),
            ("nodata", 0.0, 1.0, "a share in [0, 1]"),
            ("similarity", -MAX_ABS_SIMILARITY, MAX_ABS_SIMILARITY, "a finite cosine in [-1, 1]"),
            (
                "cluster_id",
                -1,
                num_clusters - 1,
                f"in [-1, num_clusters={num_clusters}) (-1 = no cluster)",
            ),
            ("valid", 0, 1, "0 or 1"),
        ):
            col = cols.get(name)
            if col is not None and len(col) and not (col.min() >= lo and col.max() <= hi):
                fail(name, ~((col >= lo) & (col <= hi)), col, rule)
    if "valid" in cols and "reason" in cols:
        v, r = cols["valid"], cols["reason"]
        if len(r) and r.max() > shards.num_reasons.min(initial=0):
            limit = np.repeat(shards.num_reasons, shards.counts)
            fail("reason", r > limit, r, "0 (ok) or a code 1..len(reasons) of the 'reasons' list")
        ok = r == 0
        if not np.array_equal(ok, v.view(np.bool_)):  # valid is 0/1 here, so a bool view is exact
            rule = "0 exactly for valid samples (an invalid sample needs its reason)"
            fail("reason", ok != v.view(np.bool_), r, rule)
    if "offset" in cols and "length" in cols:
        check_ranges(cols["offset"], cols["length"], shards)


def check_ranges(offset: NDArray[np.int64], length: NDArray[np.int64], shards: Shards) -> None:
    """Byte ranges of the samples of each shard: in tar order, disjoint, inside the shard."""
    fail = shards.fail
    n = len(offset)
    if not n:
        return
    if offset.min() < 0:
        fail("offset", offset < 0, offset, ">= 0")
    if length.min() <= 0:
        fail("length", length <= 0, length, "> 0 bytes")
    end = offset + length
    # sample i + 1 starts at or after the end of sample i of the same shard: tar order, no overlap
    bad = np.empty(n, np.bool_)
    np.less(offset[1:], end[:-1], out=bad[1:])
    bad[shards.starts[:-1][shards.counts > 0]] = (
        False  # the first sample of a shard follows nothing
    )
    fail(
        "offset",
        bad,
        offset,
        "rising in tar order, each sample starting after the previous one ends",
    )
    # rising and disjoint: the last sample of a shard is the one that must end inside it
    last = np.zeros(n, np.bool_)
    nonempty = shards.counts > 0
    ends = shards.starts[1:][nonempty] - 1
    last[ends] = end[ends] > shards.shard_sizes[nonempty]
    fail("length", last, length, "within the shard (offset + length <= shard_size)")


def check_keys(key_bytes: NDArray[Any], key_offsets: NDArray[Any], n: int, path: object) -> None:
    """``key_offsets`` has ``n + 1`` values rising strictly from 0 to ``len(key_bytes)`` (every
    key is non-empty), both with the format's dtypes."""
    check_tensor("key_bytes", key_bytes, np.uint8, (key_bytes.size,), path)
    check_tensor("key_offsets", key_offsets, np.int64, (n + 1,), path)
    if key_offsets[0] != 0 or key_offsets[-1] != key_bytes.size:
        raise corrupt(
            path,
            "key_offsets",
            f"must run from 0 to len(key_bytes)={key_bytes.size}, "
            f"got {int(key_offsets[0])} .. {int(key_offsets[-1])}",
        )
    empty = np.diff(key_offsets) <= 0
    if empty.any():
        i = int(np.argmax(empty))
        raise corrupt(
            path,
            "key_offsets",
            f"must be strictly rising (every key non-empty), key "
            f"{i} spans [{int(key_offsets[i])}, {int(key_offsets[i + 1])})",
        )
