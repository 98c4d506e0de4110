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


def _range(path: object, name: str, bad: NDArray[np.bool_], col: NDArray[Any], rule: str) -> None:
    if bad.any():
        i = int(np.argmax(bad))
        raise corrupt(
            path,
            name,
            f"must be {rule}, sample {i} has {col[i].item()!r} "
            f"({int(bad.sum())} sample(s) out of range)",
        )


def check_values(cols: Mapping[str, NDArray[Any]], meta: Mapping[str, str], path: object) -> None:
    """Value ranges of the core columns present in ``cols`` (dtypes and shapes already checked).

    ``entropy`` finite in [0, 8] bits, ``nodata`` in [0, 1], ``similarity`` finite in [-1, 1],
    ``cluster_id`` in [-1, num_clusters), ``valid`` in {0, 1}, ``reason`` a code of the
    ``reasons`` list with ``valid == (reason == 0)``, and byte ranges inside the shard:
    ``offset >= 0``, ``length > 0``, each sample starting at or after the end of the previous one
    (tar order), the last ending by ``shard_size``.
    """
    k = int(meta["num_clusters"])
    with np.errstate(invalid="ignore"):
        if "entropy" in cols:
            e = cols["entropy"]
            _range(path, "entropy", ~((e >= 0) & (e <= MAX_ENTROPY)), e, "finite in [0, 8] bits")
        if "nodata" in cols:
            d = cols["nodata"]
            _range(path, "nodata", ~((d >= 0) & (d <= 1)), d, "a share in [0, 1]")
        if "similarity" in cols:
            s = cols["similarity"]
            _range(
                path,
                "similarity",
                ~(np.abs(s) <= MAX_ABS_SIMILARITY),
                s,
                "a finite cosine in [-1, 1]",
            )
    if "cluster_id" in cols:
        z = cols["cluster_id"]
        _range(
            path,
            "cluster_id",
            (z < -1) | (z >= k),
            z,
            f"in [-1, num_clusters={k}) (-1 = no cluster)",
        )
    if "valid" in cols:
        v = cols["valid"]
        _range(path, "valid", v > 1, v, "0 or 1")
        if "reason" in cols:
            r = cols["reason"]
            n_reasons = len(parse_reasons(meta, path))
            _range(
                path,
                "reason",
                r > n_reasons,
                r,
                f"0 (ok) or a code 1..{n_reasons} of the 'reasons' list",
            )
            _range(
                path,
                "reason",
                (r == 0) != (v == 1),
                r,
                "0 exactly for valid samples (an invalid sample needs its reason)",
            )
    if "offset" in cols and "length" in cols:
        check_ranges(cols["offset"], cols["length"], int(meta["shard_size"]), path)


def check_ranges(
    offset: NDArray[np.int64], length: NDArray[np.int64], shard_size: int, path: object
) -> None:
    """Byte ranges of the samples of one shard: in tar order, disjoint, inside the shard."""
    _range(path, "offset", offset < 0, offset, ">= 0")
    _range(path, "length", length <= 0, length, "> 0 bytes")
    if not len(offset):
        return
    end = offset + length
    # sample i + 1 starts at or after the end of sample i: tar order, no overlap
    _range(
        path,
        "offset",
        np.concatenate([[False], offset[1:] < end[:-1]]),
        offset,
        "rising in tar order, each sample starting after the previous one ends",
    )
    _range(
        path,
        "length",
        end > shard_size,
        length,
        f"within the shard (offset + length <= shard_size={shard_size})",
    )


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
    step = np.diff(key_offsets)
    _range(path, "key_offsets", step <= 0, step, "strictly rising (every key non-empty)")
