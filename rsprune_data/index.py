"""The per-shard index file and :class:`PruneIndex`, the concatenation of many of them.

One safetensors file per tar shard, ``<shard>.rsidx.safetensors`` beside the shard or
``<index_dir>/<shard basename>.rsidx.safetensors``, holds one row per sample in tar order (schema
below). It is written atomically and read without pickle. A :class:`PruneIndex` joins the indexes of
many shards: global position = order of the shards given, then tar order.

Format versions: 2 added the ``checksum`` column (``xxh3_64`` of each sample's byte range, see
:mod:`rsprune_data.integrity`) and the ``checksum`` metadata naming its algorithm. Version-1
indexes are still read, without checksums: their samples are checked by key only, and loading
them warns once per process with the command that upgrades them (``rsprune-data index`` treats
a version-1 index as not current and rewrites it, same kind, no ``--overwrite`` needed). An index
written without a ``checksum`` array (hand-made, tests) has ``checksum = "none"`` and is read the
same way. The member layout (four ``member_*`` tensors and the ``member_exts`` metadata,
:mod:`rsprune_data.layout`) is optional in version 2: indexes written before it existed, or by
hand without it, are read as they are and their samples' headers are walked at load time.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from functools import cached_property
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload
from urllib.parse import urlparse

import numpy as np
from numpy.typing import NDArray

from . import index_check as check
from ._fsio import atomic_write_bytes, remove_temporaries
from .errors import (
    ConfigError,
    IndexCorruptError,
    IndexMismatchError,
    IndexNotFoundError,
    StaleIndexError,
)
from .layout import (
    DIGEST_KEY,
    EXTS_KEY,
    MEMBER_TENSORS,
    MemberLayout,
    Members,
    check_members,
    layout_digest,
    layout_of,
)

if TYPE_CHECKING:
    from .config import PruneConfig

# --- schema --------------------------------------------------------------------------------------
FORMAT_NAME = "rsprune-index"
FORMAT_VERSION = "2"
READABLE_VERSIONS = ("1", FORMAT_VERSION)  # version 1: no checksum column (module docstring)
INDEX_SUFFIX = ".rsidx.safetensors"
SAMPLE_TENSORS: dict[str, type[np.generic]] = {  # one value per sample, in tar order
    "entropy": np.float32,  # Stage I luma entropy in bits
    "nodata": np.float32,  # share of no-data pixels
    "cluster_id": np.int16,  # nearest prior centroid; -1 when invalid or entropy-only
    "similarity": np.float32,  # cosine to that centroid; 0.0 when invalid
    "valid": np.uint8,  # 1 = decoded fine
    "reason": np.uint8,  # 0 = ok, c > 0 = reasons[c - 1] (the "reasons" metadata list)
    "offset": np.int64,  # byte range of the sample in the tar (tario.TarSample)
    "length": np.int64,
    "checksum": np.uint64,  # xxh3_64 of those bytes (integrity.checksum); 0 when "checksum" = none
}
# All keys' utf-8 (surrogateescape) bytes back to back: key i = key_bytes[off[i] : off[i + 1]].
KEY_TENSORS: dict[str, type[np.generic]] = {"key_bytes": np.uint8, "key_offsets": np.int64}
# Metadata, all str. write_index fills in format, version, num_samples and a default created_by;
# shard_metadata(shard) gives the four shard_* fields. write_index also sets "checksum" (the
# algorithm, or "none" without a checksum array); version-1 files lack it.
METADATA_KEYS = (
    *("format", "version", "shard", "shard_size", "shard_mtime_ns", "shard_fingerprint"),
    *("encoder", "centroids_digest", "num_clusters", "num_samples", "reasons", "created_by"),
)
# Optional per-sample columns, beside the core tensors: float32 tensors named "meta.<field>" (a
# numeric field of the sample's .json member, or a Parquet column packed into it) or
# "score.<name>" (a pixel score such as score.cloud), NaN = missing. The "columns" metadata entry
# (JSON) describes each: {name: {"dtype": "float32", "version": "1", "source": "..."}}; an index
# without it has no optional columns (files written before they existed read as such).
OPTIONAL_PREFIXES = ("meta.", "score.")
OPTIONAL_DTYPE = np.float32
COLUMNS_KEY = "columns"
# across shards; versions 1 and 2 mix (a shard's checksums are used where it has them)
MUST_AGREE = ("encoder", "centroids_digest", "num_clusters", "entropy_mode")
FINGERPRINT_BYTES = 64 * 1024
FINGERPRINT_BLOCKS = 32
_SCHEMA = {**SAMPLE_TENSORS, **KEY_TENSORS}
_REMOTE = ("pipe:", "http://", "https://", "s3://", "gs://", "ais://", "hf://")
_PathLike = str | os.PathLike[str]
_MISSING = "its shard does not exist"


def is_remote(shard: _PathLike) -> bool:
    """Whether ``shard`` is a URL or ``pipe:`` command rather than a local file."""
    s = os.fspath(shard)
    return s.startswith(_REMOTE) or ("://" in s and not s.startswith("file://"))


def index_path_for(shard: _PathLike, index_dir: _PathLike | None = None) -> Path:
    """Where the index of ``shard`` lives (a remote shard needs ``index_dir``).

    Example:
        >>> index_path_for("data/shard-000001.tar", "idx").as_posix()
        'idx/shard-000001.tar.rsidx.safetensors'
    """
    s = os.fspath(shard)
    if index_dir is None:
        if is_remote(s):
            raise ConfigError(
                f"shard {s!r} is remote: pass index_dir= (`--index-dir` on the command line) "
                "to say where its index is"
            )
        return Path(s.removeprefix("file://") + INDEX_SUFFIX)
    url = s.split()[-1] if s.startswith("pipe:") else s  # `pipe:curl -s URL` -> URL
    return Path(index_dir) / (os.path.basename(urlparse(url).path or url) + INDEX_SUFFIX)


def shard_fingerprint(path: _PathLike) -> str:
    """A cheap content digest: sha256 of the size, the first and last 64 KiB, and
    ``FINGERPRINT_BLOCKS`` evenly spaced 4 KiB blocks in between (about 256 KiB read in all), so a
    rewrite of the same size is caught in the middle of the shard too, not only at its ends."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        h.update(b"%d\n" % size)
        h.update(f.read(FINGERPRINT_BYTES))
        for i in range(1, FINGERPRINT_BLOCKS + 1):
            f.seek(size * i // (FINGERPRINT_BLOCKS + 1))
            h.update(f.read(4096))
        f.seek(max(0, size - FINGERPRINT_BYTES))
        h.update(f.read(FINGERPRINT_BYTES))
    return h.hexdigest()[:32]


def shard_metadata(path: _PathLike) -> dict[str, str]:
    """The metadata tying an index to its shard; take it *before* reading the shard."""
    st = os.stat(path)
    return {
        "shard": os.path.basename(path),
        "shard_size": str(st.st_size),
        "shard_mtime_ns": str(st.st_mtime_ns),
        "shard_fingerprint": shard_fingerprint(path),
    }


def shard_is_stale(shard: _PathLike, meta: Mapping[str, str]) -> str | None:
    """Why a local ``shard`` no longer matches its index metadata, or ``None`` when it does.

    Cheap first: another size is stale; the same size and mtime is current; a new mtime costs one
    :func:`shard_fingerprint` (about 256 KiB read) to tell a touch or a copy from a rewrite.
    """
    local = os.fspath(shard).removeprefix("file://")
    try:
        st = os.stat(local)
    except FileNotFoundError:
        return _MISSING
    if st.st_size != int(meta["shard_size"]):
        return f"shard {shard} changed size from {meta['shard_size']} to {st.st_size} bytes"
    if st.st_mtime_ns == int(meta["shard_mtime_ns"]):
        return None
    same = shard_fingerprint(local) == meta["shard_fingerprint"]
    return None if same else f"the content of shard {shard} changed since it was indexed"


def encode_keys(keys: Sequence[str]) -> dict[str, NDArray[Any]]:
    """The ``key_bytes`` and ``key_offsets`` tensors of the sample keys, in tar order."""
    raw = [k.encode("utf-8", "surrogateescape") for k in keys]
    offsets = np.zeros(len(raw) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in raw], out=offsets[1:])
    return {"key_bytes": np.frombuffer(b"".join(raw), np.uint8).copy(), "key_offsets": offsets}


# --- one file ------------------------------------------------------------------------------------
def column_info(source: str, version: str = "1") -> dict[str, str]:
    """The ``columns`` metadata entry of one optional column (see the schema above)."""
    return {"dtype": np.dtype(OPTIONAL_DTYPE).name, "version": version, "source": source}


def write_index(path: _PathLike, arrays: Mapping[str, Any], metadata: Mapping[str, str]) -> None:
    """Check and write one shard index atomically: temp file in the same folder, fsync, rename.

    Everything :func:`read_index` checks is checked here too, so a file that was written can be read.

    Optional columns (``meta.*``, ``score.*``) in ``arrays`` must be described, each of them and
    nothing else, by the JSON ``columns`` metadata entry (:func:`column_info`).

    Raises:
        ConfigError: a tensor or metadata field is missing or inconsistent (the message names it).
    """
    from safetensors.numpy import save

    from .integrity import CHECKSUM, NO_CHECKSUM

    n = len(arrays["entropy"]) if "entropy" in arrays else 0
    has_sums = "checksum" in arrays
    if not has_sums:
        arrays = {**arrays, "checksum": np.zeros(n, np.uint64)}
    out = {k: np.ascontiguousarray(arrays.get(k, ()), dtype=dt) for k, dt in _SCHEMA.items()}
    meta = {"created_by": "rsprune_data", **metadata}
    meta.update(
        format=FORMAT_NAME,
        version=FORMAT_VERSION,
        num_samples=str(n),
        checksum=CHECKSUM if has_sums else NO_CHECKSUM,
    )
    try:
        _check_arrays(out, meta, path)
    except IndexCorruptError as exc:
        raise ConfigError(f"index {path}: field {exc.field!r} {exc.problem}") from None
    out.update(_optional_arrays(arrays, meta, n, path))
    lossy = [
        k
        for k in ("cluster_id", "valid", "reason")
        if not np.array_equal(out[k], arrays.get(k, ()))
    ]
    if lossy:
        raise ConfigError(
            f"index {path}: {lossy} do not fit {[_SCHEMA[k].__name__ for k in lossy]}"
        )
    try:
        _validate(out, meta, path)
    except IndexCorruptError as exc:
        raise ConfigError(f"index {path}: field {exc.field!r} {exc.problem}") from None
    out.update(_member_arrays(arrays, meta, out["length"], path))  # after the ranges' checks
    _digest_members(out, meta)
    atomic_write_bytes(path, save(out, metadata=meta))


def _optional_arrays(
    arrays: Mapping[str, Any], meta: Mapping[str, str], n: int, path: object
) -> dict[str, NDArray[Any]]:
    names = sorted(k for k in arrays if k.startswith(OPTIONAL_PREFIXES))
    described = _column_infos(meta, path)
    if sorted(described) != names:
        raise ConfigError(
            f"index {path}: optional columns {names} must match the `columns` "
            f"metadata {sorted(described)}: use column_info(source) for each"
        )
    out = {k: np.ascontiguousarray(arrays[k], dtype=OPTIONAL_DTYPE) for k in names}
    wrong = [k for k, v in out.items() if v.shape != (n,)]
    if wrong:
        raise ConfigError(
            f"index {path}: optional columns {wrong} must have num_samples={n} values"
        )
    return out


def _member_arrays(
    arrays: Mapping[str, Any], meta: Mapping[str, str], lengths: NDArray[Any], path: object
) -> dict[str, NDArray[Any]]:
    """The member layout tensors to write (:mod:`.layout`): all four with ``member_exts``, or
    none of them."""
    given = [k for k in MEMBER_TENSORS if k in arrays]
    if not given and EXTS_KEY not in meta:
        return {}
    if len(given) < len(MEMBER_TENSORS) or EXTS_KEY not in meta:
        raise ConfigError(
            f"index {path}: the member layout needs all of {sorted(MEMBER_TENSORS)} and the "
            f"{EXTS_KEY!r} metadata, got {given} and {sorted(k for k in meta if k == EXTS_KEY)}: "
            "pass all of them (layout.encode_members) or none"
        )
    out = {k: np.ascontiguousarray(arrays[k], dtype=dt) for k, dt in MEMBER_TENSORS.items()}
    try:
        check_members(out, meta, lengths, path)
    except IndexCorruptError as exc:
        raise ConfigError(f"index {path}: field {exc.field!r} {exc.problem}") from None
    return out


def _digest_members(out: Mapping[str, NDArray[Any]], meta: dict[str, str]) -> None:
    """Set ``member_digest`` for the layout being written (:func:`layout.layout_digest`)."""
    meta.pop(DIGEST_KEY, None)
    if EXTS_KEY in meta:
        meta[DIGEST_KEY] = layout_digest(out, meta[EXTS_KEY], out["checksum"])


def _column_infos(meta: Mapping[str, str], path: object) -> dict[str, dict[str, str]]:
    raw = meta.get(COLUMNS_KEY)
    if raw is None:
        return {}
    try:
        infos = json.loads(raw)
    except ValueError:
        infos = None
    ok = isinstance(infos, dict) and all(
        isinstance(k, str)
        and k.startswith(OPTIONAL_PREFIXES)
        and isinstance(v, dict)
        and v.get("dtype") == np.dtype(OPTIONAL_DTYPE).name
        and isinstance(v.get("version"), str)
        for k, v in infos.items()
    )
    if not ok:
        raise IndexMismatchError(
            f"index {path}: `columns` metadata {raw!r} is not a JSON object of "
            "meta.*/score.* names -> {dtype: float32, version, source}: "
            "run `rsprune-data index --force` again"
        )
    return dict(infos)


def remove_stale_temporaries(path: _PathLike) -> None:
    """Delete the temp files that a killed :func:`write_index` of ``path`` left behind."""
    remove_temporaries(path)


def _check_arrays(a: dict[str, NDArray[Any]], meta: dict[str, str], path: object) -> None:
    n = int(meta["num_samples"])
    missing = [k for k in METADATA_KEYS if not isinstance(meta.get(k), str)]
    if missing:
        raise ConfigError(
            f"index {path}: metadata {missing} missing or not str "
            "(shard_metadata(shard) gives the shard_* fields)"
        )
    check.check_metadata(meta, METADATA_KEYS, path)  # numbers and JSON parse
    wrong = [k for k in SAMPLE_TENSORS if a[k].shape != (n,)]
    ko, k, reasons = a["key_offsets"], int(meta["num_clusters"]), json.loads(meta["reasons"])
    if (
        wrong
        or ko.shape != (n + 1,)
        or ko[0] != 0
        or ko[-1] != a["key_bytes"].size
        or (np.diff(ko) < 0).any()
    ):
        raise ConfigError(
            f"index {path}: {wrong} must have num_samples={n} values and key_offsets"
            " n + 1 rising from 0 to len(key_bytes): use encode_keys(keys)"
        )
    z, valid, reason = a["cluster_id"], a["valid"], a["reason"]
    if n and (z.min() < -1 or z.max() >= k or valid.max() > 1 or reason.max() > len(reasons)):
        raise ConfigError(
            f"index {path}: cluster_id must be in [-1, num_clusters={k}), valid 0 "
            f"or 1 and reason <= len(reasons={reasons})"
        )


def _open(path: Path, shard: str | None = None, index_dir: object = None) -> Any:
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(path, framework="np")
    except FileNotFoundError:
        where = "" if index_dir is None else f" --index-dir {index_dir}"
        from .reading import local_path

        if shard is not None and not is_remote(shard) and not os.path.exists(local_path(shard)):
            raise IndexNotFoundError(
                f"no index for shard {shard} (looked for {path}), and the shard itself does not "
                "exist: check the path or the pattern it came from"
            ) from None
        raise IndexNotFoundError(
            f"no index for shard {shard or path} (looked for {path}): run "
            f"`rsprune-data index {shard or '<shard>'}{where}` first (with `--centroids "
            "CENTROIDS.safetensors` for the cluster-balanced selection)"
        ) from None
    except SafetensorError as exc:
        raise IndexCorruptError(
            f"index {path} is unreadable ({exc}): delete it and run `rsprune-data index` again",
            "<file>",
            "unreadable",
        ) from None


def _checked(meta: Mapping[str, str] | None, path: Path) -> dict[str, str]:
    meta = meta or {}
    if meta.get("format") != FORMAT_NAME:
        raise IndexMismatchError(f"{path} is not an rsprune index (format={meta.get('format')!r})")
    if meta.get("version") not in READABLE_VERSIONS:
        raise IndexMismatchError(
            f"index {path} has format version {meta.get('version')!r}, this "
            f"rsprune_data reads {list(READABLE_VERSIONS)}: run "
            "`rsprune-data index` again or upgrade rsprune_data"
        )
    return dict(meta)


def read_metadata(path: _PathLike) -> dict[str, str]:
    """The metadata of one index file (reads only its header), validated.

    Raises:
        IndexCorruptError: a field is missing or does not parse.
        IndexMismatchError: not an rsprune index, or another format version.
    """
    with _open(Path(path)) as f:
        return _metadata(f, Path(path))


def read_index(path: _PathLike) -> tuple[dict[str, NDArray[Any]], dict[str, str]]:
    """Every tensor (optional columns included) and the metadata of one index file, validated
    (:mod:`.index_check`).

    Raises:
        IndexCorruptError: a tensor is missing or has the wrong dtype, length or values, or the
            metadata is incomplete; the message names the file, the field and the fix.
        IndexMismatchError: not an rsprune index, or another format version.

    ``checksum`` is left out when the file has none (version 1, or ``checksum = "none"``), so
    that writing the arrays back does not turn zeros into checksums.
    """
    p = Path(path)
    with _open(p) as f:
        meta = _metadata(f, p)
        names = {k: dt for k, dt in _SCHEMA.items() if k != "checksum" or has_checksums(meta)}
        optional = {k: OPTIONAL_DTYPE for k in sorted(_column_infos(meta, p))}
        layout = MEMBER_TENSORS if EXTS_KEY in meta else {}
        arrays = _tensors(f, {**names, **optional, **layout}, p, meta)
    _validate(arrays, meta, p)
    _check_optional(arrays, optional, meta, p)
    if layout:
        sums = arrays.get("checksum", np.zeros(int(meta["num_samples"]), np.uint64))
        check_members(arrays, meta, arrays["length"], p, sums)
    return arrays, meta


def read_layout(path: _PathLike) -> tuple[MemberLayout | None, dict[str, NDArray[Any]]]:
    """The member layout of one index file (``None`` if it has none) and its ``offset``,
    ``length`` and ``checksum`` (for the caller to check that the file is still the one it
    loaded)."""
    p = Path(path)
    with _open(p) as f:
        meta = _metadata(f, p)
        core = {k: SAMPLE_TENSORS[k] for k in ("offset", "length", "checksum")}
        layout = MEMBER_TENSORS if EXTS_KEY in meta else {}
        arrays = _tensors(f, {**core, **layout}, p, meta)
    _validate({k: arrays[k] for k in core}, meta, p)
    return layout_of(arrays, meta, p), arrays


def read_columns(
    path: _PathLike, names: Sequence[str]
) -> tuple[dict[str, NDArray[Any]], dict[str, str]]:
    """Some per-sample tensors and the metadata of one index file, validated like
    :func:`read_index` (what a DataLoader worker re-reads instead of a pickled copy)."""
    p = Path(path)
    with _open(p) as f:
        meta = _metadata(f, p)
        arrays = _tensors(f, {k: SAMPLE_TENSORS[k] for k in names}, p, meta)
    _validate(arrays, meta, p)
    return arrays, meta


def _check_optional(
    arrays: Mapping[str, NDArray[Any]],
    names: Mapping[str, Any],
    meta: Mapping[str, str],
    path: object,
) -> None:
    n = int(meta["num_samples"])
    for name in names:
        check.check_tensor(name, arrays[name], OPTIONAL_DTYPE, (n,), path)


def _metadata(f: Any, path: Path) -> dict[str, str]:
    return check.check_metadata(_checked(f.metadata(), path), METADATA_KEYS, path)


def _tensors(
    f: Any, names: Mapping[str, type[np.generic]], path: Path, meta: Mapping[str, str]
) -> dict[str, NDArray[Any]]:
    """The tensors ``names`` of an open file; a missing one is an :class:`IndexCorruptError`
    (except ``checksum`` of a version-1 file, which has none: zeros, see :func:`_tensor`)."""
    present = set(f.keys())
    v1 = meta.get("version") == "1"
    missing = [k for k in names if k not in present and not (k == "checksum" and v1)]
    if missing:
        raise check.corrupt(path, missing[0], f"is missing (all missing: {missing})")
    return {k: _tensor(f, k, meta) for k in names}


def _check_shapes(
    arrays: Mapping[str, NDArray[Any]], meta: Mapping[str, str], path: object
) -> None:
    n = int(meta["num_samples"])
    for name, dtype in SAMPLE_TENSORS.items():
        if name in arrays:
            check.check_tensor(name, arrays[name], dtype, (n,), path)


def _validate(arrays: Mapping[str, NDArray[Any]], meta: Mapping[str, str], path: object) -> None:
    """Dtypes, lengths and value ranges of one file's tensors (those of the schema it holds)."""
    n = int(meta["num_samples"])
    _check_shapes(arrays, meta, path)
    check.check_values(arrays, meta, path)
    if "key_bytes" in arrays and "key_offsets" in arrays:
        check.check_keys(arrays["key_bytes"], arrays["key_offsets"], n, path)


def _tensor(f: Any, name: str, meta: Mapping[str, str]) -> NDArray[Any]:
    if name == "checksum" and meta.get("version") == "1":
        return np.zeros(int(meta["num_samples"]), np.uint64)  # version 1 has no checksums
    return f.get_tensor(name)  # type: ignore[no-any-return]


def has_checksums(meta: Mapping[str, str]) -> bool:
    """Whether an index (its metadata) carries per-sample checksums the loaders can verify."""
    from .integrity import CHECKSUM

    return meta.get("checksum") == CHECKSUM


_warned_unchecked = False


def _warn_unchecked(shards: Sequence[str], total: int) -> None:
    global _warned_unchecked
    if _warned_unchecked or not shards:
        return
    _warned_unchecked = True  # once per process: workers reload the index, one line is enough
    warnings.warn(
        f"{len(shards)} of {total} shard indexes (first: {shards[0]}) have no per-sample "
        "checksums (format version 1 or written without them): the loaders check their keys but "
        "cannot detect changed bytes. Run `rsprune-data index <shards> ...` again to add them "
        "(same arguments; version-1 indexes are rewritten, others need --force).",
        UserWarning,
        stacklevel=3,
    )


# --- many files ----------------------------------------------------------------------------------
class KeyList(Sequence[str]):
    """The ``__key__`` of every sample, decoded on access from the packed key tensors."""

    def __init__(self, data: NDArray[np.uint8], offsets: NDArray[np.int64]) -> None:
        self._data, self._offsets = data, offsets

    @classmethod
    def of(cls, keys: Sequence[str]) -> KeyList:
        t = encode_keys(keys)
        return cls(t["key_bytes"], t["key_offsets"])

    def __len__(self) -> int:
        return len(self._offsets) - 1

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> list[str]: ...
    def __getitem__(self, i: int | slice) -> str | list[str]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(f"key position {i} out of range for {len(self)} samples")
        i %= len(self)
        return (
            self._data[self._offsets[i] : self._offsets[i + 1]]
            .tobytes()
            .decode("utf-8", "surrogateescape")
        )

    def take(self, positions: NDArray[np.int64]) -> list[str]:
        """The keys at ``positions``, decoded in one pass (cheap for nearby positions, such as
        the selected samples of one shard)."""
        pos = np.asarray(positions, dtype=np.int64)
        if pos.shape[0] == 0:
            return []
        a, b = self._offsets[pos], self._offsets[pos + 1]
        lo = int(a.min())
        raw = self._data[lo : int(b.max())].tobytes()
        xs, ys = (a - lo).tolist(), (b - lo).tolist()
        if raw.isascii():  # byte offsets are character offsets: slice one decoded string
            text = raw.decode("ascii")
            return list(map(text.__getitem__, map(slice, xs, ys)))
        return [raw[x:y].decode("utf-8", "surrogateescape") for x, y in zip(xs, ys, strict=True)]

    def __iter__(self) -> Iterator[str]:
        raw, off = self._data.tobytes(), self._offsets.tolist()
        return (raw[a:b].decode("utf-8", "surrogateescape") for a, b in pairwise(off))


class PruneIndex:
    """Per-sample scores of many shards, joined in the order the shards were given.

    Global position ``i`` is sample ``i - shard_starts[s]`` (tar order) of shard
    ``s = shard_ids[i]``.
    Arrays: ``entropy``, ``nodata``, ``similarity`` (float32), ``cluster_ids`` (int16, -1 = none),
    ``valid`` (bool), ``reason`` (uint8; ``reasons[code]`` names it, ``reasons[0] == "ok"``),
    ``offsets``/``lengths`` (int64 byte ranges in the tar), ``checksums`` (uint64 xxh3_64 of each
    range, real where ``checksummed[shard]``). ``keys`` are read on first access.
    ``fingerprint`` digests the shard fingerprints, encoder, centroids, K and the sample count.
    ``columns``: the optional per-sample columns (``meta.<field>``, ``score.<name>``; float32,
    NaN = missing), each joined over all shards; a shard indexed without a column contributes NaN
    for it. ``column_info`` describes them (dtype, version, source).
    ``fingerprint`` digests the shard fingerprints, encoder, centroids, K and the sample count
    (and the optional columns' names and versions, when there are any).

    Example:
        >>> index = PruneIndex.load("shards/shard-{000000..000099}.tar")  # doctest: +SKIP
        >>> keep = index.select(PruneConfig(prune_ratio=0.85))  # doctest: +SKIP
    """

    def __init__(
        self,
        columns: Mapping[str, NDArray[Any]],
        shard_starts: NDArray[np.int64],
        metadata: Sequence[Mapping[str, str]],
        *,
        shards: Sequence[str],
        index_paths: Sequence[Path] = (),
        reasons: Sequence[str] = ("ok",),
        keys: KeyList | None = None,
        column_info: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        self.entropy: NDArray[np.float32] = columns["entropy"]
        self.nodata: NDArray[np.float32] = columns["nodata"]
        self.cluster_ids: NDArray[np.int16] = columns["cluster_id"]
        self.similarity: NDArray[np.float32] = columns["similarity"]
        self.valid: NDArray[np.bool_] = columns["valid"] != 0
        self.reason: NDArray[np.uint8] = columns["reason"]
        self.offsets: NDArray[np.int64] = columns["offset"]
        self.lengths: NDArray[np.int64] = columns["length"]
        self.checksums: NDArray[np.uint64] = (
            columns["checksum"] if "checksum" in columns else np.zeros(len(self.entropy), np.uint64)
        )
        self.shard_starts = shard_starts
        self.shards, self.index_paths = list(shards), list(index_paths)
        self.metadata, self.reasons = [dict(m) for m in metadata], list(reasons)
        #: per shard: whether its ``checksums`` are real (see :func:`has_checksums`)
        self.checksummed: NDArray[np.bool_] = np.array(
            [has_checksums(m) for m in self.metadata]
            if len(self.metadata) == len(self.shards)
            else [False] * len(self.shards),
            dtype=bool,
        )
        self.encoder: str = self.metadata[0].get("encoder", "")
        self.centroids_digest: str = self.metadata[0].get("centroids_digest", "")
        self.num_clusters: int = int(self.metadata[0].get("num_clusters", "0"))
        self._keys = keys
        self._layouts: dict[int, MemberLayout | None] = {}  # per shard, read by members()
        self.columns: dict[str, NDArray[np.float32]] = {
            k: np.asarray(v, dtype=OPTIONAL_DTYPE)
            for k, v in columns.items()
            if k.startswith(OPTIONAL_PREFIXES)
        }
        self.column_info: dict[str, dict[str, str]] = {
            k: dict((column_info or {}).get(k, column_info_default(k))) for k in self.columns
        }
        self._embeddings: NDArray[Any] | None = None  # attach_embeddings (in-memory indexes)
        self._dup_of: dict[float, NDArray[np.int64]] = {}
        parts = [m.get("shard_fingerprint", "") for m in self.metadata]
        parts += [self.encoder, self.centroids_digest, str(self.num_clusters), str(len(self))]
        if self.columns:  # absent columns leave the fingerprint of older indexes unchanged
            parts += [f"{k}:{v['version']}" for k, v in sorted(self.column_info.items())]
        self.fingerprint: str = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]

    def __len__(self) -> int:
        return len(self.entropy)

    def __repr__(self) -> str:
        return f"PruneIndex({len(self)} samples, {len(self.shards)} shards, K={self.num_clusters})"

    @cached_property
    def shard_ids(self) -> NDArray[np.int32]:
        """Which shard each global position comes from."""
        counts = np.diff(self.shard_starts)
        return np.repeat(np.arange(len(counts), dtype=np.int32), counts)

    @property
    def keys(self) -> KeyList:
        """The ``__key__`` of every sample (read from the index files on first access)."""
        if self._keys is None and not self.index_paths:  # in memory without keys: none to check
            self._keys = KeyList(np.zeros(0, np.uint8), np.zeros(1, np.int64))
        if self._keys is None:
            data, offsets, base = [np.zeros(0, np.uint8)], [np.zeros(1, np.int64)], 0
            for path, n in zip(self.index_paths, np.diff(self.shard_starts), strict=True):
                with _open(path) as f:
                    meta = _metadata(f, path)
                    now = int(meta["num_samples"])
                    kb, ko = _tensors(f, KEY_TENSORS, path, meta).values()
                if now != n:
                    raise StaleIndexError(f"index {path} changed since it was loaded: load again")
                check.check_keys(kb, ko, int(n), path)
                data.append(kb)
                offsets.append(ko[1:] + base)
                base += len(kb)
            self._keys = KeyList(np.concatenate(data), np.concatenate(offsets))
        return self._keys

    def members(self, shard: int, numbers: NDArray[np.int64]) -> Members | None:
        """The member layout of samples ``numbers`` (numbers in shard ``shard``), from its
        index file (read on first use; :mod:`.layout`), or ``None`` where there is none: an
        index written without one, an index in memory, or a file that changed since loading."""
        if shard not in self._layouts:
            got = None
            if self.index_paths:
                try:
                    layout, cols = read_layout(self.index_paths[shard])
                except FileNotFoundError:
                    pass  # gone since loading: the headers are walked, checksums still verified
                else:
                    a, b = int(self.shard_starts[shard]), int(self.shard_starts[shard + 1])
                    same = all(
                        np.array_equal(cols[k], mine[a:b])
                        for k, mine in (
                            ("offset", self.offsets),
                            ("length", self.lengths),
                            ("checksum", self.checksums),
                        )
                    )
                    got = layout if same else None
            self._layouts[shard] = got
        layout = self._layouts[shard]
        return None if layout is None else layout.take(numbers)

    def attach_embeddings(self, embeddings: Any) -> PruneIndex:
        """Give an in-memory index its ``[n, d]`` embeddings (for ``dedup_threshold``); returns self.

        Indexes loaded from files read their embeddings sidecars instead.
        """
        emb = np.asarray(embeddings)
        if emb.ndim != 2 or emb.shape[0] != len(self):
            raise ConfigError(f"embeddings must be [n={len(self)}, d], got shape {emb.shape}")
        self._embeddings, self._dup_of = emb, {}
        return self

    def duplicate_of(self, tau: float) -> NDArray[np.int64]:
        """The near-duplicate column for cosine threshold ``tau`` (:mod:`rsprune_data.dedup`):
        ``-1`` = kept, else the position of the kept sample duplicated. Computed once per ``tau``
        (files: cached per shard beside the index, :mod:`rsprune_data.dedup_cache`)."""
        key = float(tau)
        if key not in self._dup_of:
            if self._embeddings is not None:
                from .dedup import near_duplicates

                col = near_duplicates(
                    self._embeddings, self.cluster_ids, self.similarity, key, valid=self.valid
                )
            else:
                from .dedup_cache import duplicate_of

                col = duplicate_of(self, key)
            self._dup_of[key] = col
        return self._dup_of[key]

    def select(self, config: PruneConfig) -> NDArray[np.int64]:
        """Sorted global positions that ``config`` keeps (``plan.select_with_config``)."""
        from .plan import select_with_config

        return select_with_config(self, config)

    def summary(
        self, config: PruneConfig, selected: NDArray[np.int64] | None = None
    ) -> dict[str, Any]:
        """What ``config`` keeps and drops, for reports (``plan.selection_summary``); pass
        ``selected`` when :meth:`select` already ran, so it is not computed twice."""
        from .plan import selection_summary

        return selection_summary(self, config, selected)

    @classmethod
    def load(
        cls,
        shards: Sequence[_PathLike] | str,
        index_dir: _PathLike | None = None,
        *,
        check_stale: bool = True,
    ) -> PruneIndex:
        """Load and join the indexes of ``shards``; keys are read later, on first use.

        Args:
            shards: shard paths or URLs (one string may use braces: ``shard-{000..099}.tar``), or
                index files ``*.rsidx.safetensors`` (the shard is the path without that suffix).
            index_dir: the folder holding the indexes; default: beside each shard.
            check_stale: compare each local shard with the size/mtime/fingerprint in its index
                (see :func:`shard_is_stale`); remote shards are never checked.

        Raises:
            IndexNotFoundError: a shard has no index (names it and the command to run).
            StaleIndexError: a local shard changed since indexing, or is missing.
            IndexMismatchError: shards indexed with other encoders, centroids, K or versions.
            IndexCorruptError: an index file is damaged or malformed (wrong dtypes, lengths,
                metadata or values out of range); names the file, the field and the fix.
        """
        names, paths = _resolve(shards, index_dir)
        metas: list[dict[str, str]] = []
        cols: dict[str, list[NDArray[Any]]] = {k: [] for k in SAMPLE_TENSORS}
        optional: list[dict[str, NDArray[Any]]] = []
        infos: dict[str, dict[str, str]] = {}
        for shard, path in zip(names, paths, strict=True):
            with _open(path, shard, index_dir) as f:
                meta = _metadata(f, path)
                _check_same(metas[0] if metas else meta, meta, names[0], shard)
                why = check_stale and not is_remote(shard) and shard_is_stale(shard, meta)
                if why:
                    fix = (
                        f"run `rsprune-data index {shard} --centroids ...` again"
                        if why != _MISSING
                        else "pass its current path (index files with "
                        "index_dir=...), or check_stale=False to use the index alone"
                    )
                    raise StaleIndexError(f"index {path} is stale: {why}; {fix}")
                mine = _tensors(f, SAMPLE_TENSORS, path, meta)
                here = _column_infos(meta, path)
                _merge_infos(infos, here, shard)
                extra = _tensors(f, {k: OPTIONAL_DTYPE for k in here}, path, meta)
            _check_shapes(mine, meta, path)  # values: below, once over all shards
            _check_optional(extra, here, meta, path)
            optional.append(extra)
            for k in cols:
                cols[k].append(mine[k])
            metas.append(meta)
        starts = np.zeros(len(names) + 1, dtype=np.int64)
        np.cumsum([len(c) for c in cols["entropy"]], out=starts[1:])
        joined = {k: np.concatenate(v) for k, v in cols.items()}
        local = [check.parse_reasons(m, p) for m, p in zip(metas, paths, strict=True)]
        check.check_columns(
            joined,
            int(metas[0]["num_clusters"]),
            check.Shards(
                list(paths), starts, [int(m["shard_size"]) for m in metas], [len(r) for r in local]
            ),
        )
        reasons = ["ok"]
        for s, names_s in enumerate(local):
            if names_s != reasons[1 : len(names_s) + 1]:  # map this shard's reason codes to ours
                reasons += [r for r in names_s if r not in reasons]
                lut = np.array([0] + [reasons.index(r) for r in names_s], dtype=np.uint8)
                part = slice(int(starts[s]), int(starts[s + 1]))
                joined["reason"][part] = lut[joined["reason"][part]]
        _warn_unchecked(
            [s for s, m in zip(names, metas, strict=True) if not has_checksums(m)], len(names)
        )
        for k in sorted(infos):  # a shard without the column: NaN, i.e. missing
            joined[k] = np.concatenate(
                [
                    o[k] if k in o else np.full(n, np.nan, OPTIONAL_DTYPE)
                    for o, n in zip(optional, np.diff(starts), strict=True)
                ]
            )
        return cls(
            joined,
            starts,
            metas,
            shards=names,
            index_paths=paths,
            reasons=reasons,
            column_info=infos,
        )

    @classmethod
    def from_arrays(
        cls,
        entropy: Any,
        cluster_ids: Any,
        similarity: Any,
        *,
        num_clusters: int,
        valid: Any = None,
        nodata: Any = None,
        offsets: Any = None,
        lengths: Any = None,
        shard_ids: Any = None,
        shards: Sequence[str] | None = None,
        keys: Sequence[str] | None = None,
        columns: Mapping[str, Any] | None = None,
    ) -> PruneIndex:
        """An in-memory index (tests, notebooks); columns not given are all valid / zero.

        ``columns`` are optional columns by full name (``{"meta.gsd": [...]}``).

        Example:
            >>> idx = PruneIndex.from_arrays([5.0, 7.0], [0, 1], [0.9, 0.8], num_clusters=2)
            >>> len(idx), idx.valid.tolist(), idx.shards
            (2, [True, True], ['<memory-0>'])
        """
        n = len(entropy)
        given = {
            "entropy": entropy,
            "cluster_id": cluster_ids,
            "similarity": similarity,
            "nodata": nodata,
            "offset": offsets,
            "length": lengths,
            "valid": np.ones(n) if valid is None else valid,
        }
        cols = {
            k: np.asarray(np.zeros(n) if given.get(k) is None else given[k], dtype=dt)
            for k, dt in SAMPLE_TENSORS.items()
        }
        sid = np.zeros(n, np.int64) if shard_ids is None else np.asarray(shard_ids, np.int64)
        num_shards = int(sid.max(initial=0)) + 1
        names = [f"<memory-{i}>" for i in range(num_shards)] if shards is None else list(shards)
        extra = {k: np.asarray(v, dtype=OPTIONAL_DTYPE) for k, v in (columns or {}).items()}
        bad = [k for k in extra if not k.startswith(OPTIONAL_PREFIXES)]
        if bad:
            raise ConfigError(
                f"from_arrays: optional column names must start with {OPTIONAL_PREFIXES}, got {bad}"
            )
        wrong = [k for k, v in {**cols, **extra, "shard_ids": sid}.items() if v.shape != (n,)]
        z = cols["cluster_id"]
        lo, hi = z.min(initial=-1), z.max(initial=-1)
        if (
            wrong
            or (np.diff(sid) < 0).any()
            or num_shards > len(names)
            or lo < -1
            or hi >= num_clusters
        ):
            raise ConfigError(
                f"from_arrays: {wrong} must have {n} values like entropy, shard_ids "
                f"must rise and be < len(shards)={len(names)} (got up to "
                f"{num_shards - 1}), cluster_ids in [-1, num_clusters={num_clusters})"
                f" (got [{lo}, {hi}])"
            )
        starts = np.searchsorted(sid, np.arange(len(names) + 1)).astype(np.int64)
        content = b"".join(v.tobytes() for v in cols.values())
        meta = {
            "shard_fingerprint": hashlib.sha256(content).hexdigest(),
            "num_clusters": str(num_clusters),
        }
        return cls(
            {**cols, **extra},
            starts,
            [meta],
            shards=names,
            keys=None if keys is None else KeyList.of(keys),
        )


def column_info_default(name: str) -> dict[str, str]:
    """What an optional column built in memory is described as."""
    return column_info(source="memory")


def _merge_infos(
    infos: dict[str, dict[str, str]], here: Mapping[str, dict[str, str]], shard: str
) -> None:
    for k, v in here.items():
        old = infos.setdefault(k, v)
        if old["version"] != v["version"]:
            raise IndexMismatchError(
                f"shard {shard} has column {k} version {v['version']!r}, an earlier shard "
                f"{old['version']!r}: index all shards with the same rsprune_data (`rsprune-data "
                "index --force`)"
            )


def check_distinct_index_paths(shards: Sequence[str], paths: Sequence[Path]) -> None:
    """Refuse two shards whose indexes would be the same file (same basename under ``index_dir``)."""
    seen: dict[Path, str] = {}
    for shard, path in zip(shards, paths, strict=True):
        if path in seen:
            raise ConfigError(
                f"shards {seen[path]!r} and {shard!r} would share the index file {str(path)!r} "
                "(index_dir keeps only the shard's file name): give the shards distinct file names "
                "or index them into separate index dirs"
            )
        seen[path] = shard


_OWN_FILES = (INDEX_SUFFIX, ".rsemb.safetensors")  # index files and embedding sidecars


def expand_shards(shards: Sequence[_PathLike] | _PathLike) -> list[str]:
    """Shard names from one pattern or a list of names and patterns, in order.

    A local name that exists is taken as it is. Anything else is brace-expanded as webdataset
    does (``pool-{000000..000127}.tar``, URLs included); local names that then hold glob
    characters are globbed, sorted (``shards/*.tar``: what a shell would have expanded, for
    patterns passed quoted or from Python).

    Raises:
        ConfigError: a local glob pattern matches no file (naming the pattern).
    """
    import glob

    from braceexpand import braceexpand

    items = [shards] if isinstance(shards, (str, os.PathLike)) else list(shards)
    out: list[str] = []
    for item in items:
        s = os.fspath(item)
        if not is_remote(s) and os.path.exists(s.removeprefix("file://")):
            out.append(s)
            continue
        for name in braceexpand(s):
            scheme = "file://" if name.startswith("file://") else ""
            local = name.removeprefix(scheme)
            if is_remote(name) or not glob.has_magic(local) or os.path.exists(local):
                out.append(name)
                continue
            found = [scheme + f for f in sorted(glob.glob(local))]
            if not local.endswith(_OWN_FILES):  # `pool/*` means the shards, not our own files
                found = [f for f in found if not f.endswith(_OWN_FILES)]
            if not found:
                raise ConfigError(
                    f"shard pattern {name!r} matches no file: check the folder and the pattern "
                    "(globs * ? [..] and braces {a,b} / {000..127} are expanded)"
                )
            out.extend(found)
    return out


def _resolve(
    shards: Sequence[_PathLike] | str, index_dir: _PathLike | None
) -> tuple[list[str], list[Path]]:
    names = expand_shards(shards)
    if not names:
        raise ConfigError("shards is empty: pass at least one shard path or index file")
    if len(set(names)) < len(names):
        dup = next(s for i, s in enumerate(names) if s in names[:i])
        raise ConfigError(f"shards lists {dup!r} twice: each shard may appear once")
    paths = [Path(s) if s.endswith(INDEX_SUFFIX) else index_path_for(s, index_dir) for s in names]
    check_distinct_index_paths(names, paths)
    return [s.removesuffix(INDEX_SUFFIX) for s in names], paths


def _check_same(ref: Mapping[str, str], meta: Mapping[str, str], first: str, shard: str) -> None:
    for field in MUST_AGREE:
        if meta.get(field) != ref.get(field):
            raise IndexMismatchError(
                f"shard {shard} was indexed with {field}={meta.get(field)!r} but {first} with "
                f"{field}={ref.get(field)!r}: index all shards with the same encoder and centroids "
                "(`rsprune-data index <shards> --centroids ...`)"
            )
