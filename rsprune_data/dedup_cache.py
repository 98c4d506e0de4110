"""The near-duplicate column of a :class:`~rsprune_data.index.PruneIndex`, cached per shard.

:func:`rsprune_data.dedup.near_duplicates` needs every sample of a cluster at once, so it runs over
the whole index (memory: the index's embeddings, ``N * d * 2`` bytes for float16 sidecars). Its result,
``dup_of`` (int64, ``-1`` = kept, else the global position of the kept sample duplicated), is stored
per shard in ``<shard>.rsdup.safetensors`` beside the index, so the next selection with the same
``tau`` only reads ``8 * N`` bytes.

The cache key (metadata ``key``) is an xxh3-128 digest over: the schema version, ``tau``, the
dedup parameters, the index's centroids digest and, in shard order, every shard's sidecar digest.
A file whose key differs (other embeddings, centroids, ``tau``, shard list or order) is recomputed
and replaced; each file holds one ``tau`` (the latest used). Written atomically; no pickle.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from . import dedup
from .embeddings import _atomic_save, read_metadata, read_sidecar, sidecar_path_of_index
from .errors import IndexNotFoundError

if TYPE_CHECKING:
    from .index import PruneIndex

FORMAT_NAME = "rsprune-dedup"
FORMAT_VERSION = "1"
CACHE_SUFFIX = ".rsdup.safetensors"


def cache_path_of_index(index_path: str | Path) -> Path:
    """``X.rsidx.safetensors`` -> ``X.rsdup.safetensors``."""
    from .index import INDEX_SUFFIX

    p = Path(index_path)
    return p.with_name(p.name.removesuffix(INDEX_SUFFIX) + CACHE_SUFFIX)


def cache_key(sidecar_digests: list[str], tau: float, centroids_digest: str) -> str:
    """The digest that keys a cached column (see the module docstring)."""
    import xxhash

    params = (dedup.DEFAULT_LIST_SIZE, dedup.DEFAULT_NPROBE, dedup.DEFAULT_PROJ_DIMS)
    text = "\n".join(
        [FORMAT_VERSION, repr(float(tau)), repr(params), centroids_digest, *sidecar_digests]
    )
    return str(xxhash.xxh3_128_hexdigest(text.encode()))


def _read_cached(path: Path, key: str, n: int) -> NDArray[np.int64] | None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT_NAME or meta.get("key") != key:
                return None
            col = f.get_tensor("dup_of")
    except (FileNotFoundError, SafetensorError, OSError, ValueError):
        return None
    return col.astype(np.int64) if col.shape == (n,) else None


def duplicate_of(index: PruneIndex, tau: float) -> NDArray[np.int64]:
    """The ``dup_of`` column of ``index`` for ``tau`` (from the cache, or computed and cached).

    Raises:
        IndexNotFoundError: the index has no embeddings sidecars (names the command that writes them).
        StaleIndexError: a sidecar is damaged or does not match its index.
    """
    tau = dedup._check_tau(tau)
    if not index.index_paths:
        raise IndexNotFoundError(
            "dedup_threshold needs stored embeddings: load the index from files "
            "indexed with --store-embeddings, or call "
            "index.attach_embeddings(emb) on an in-memory index"
        )
    starts = index.shard_starts
    sidecars = [sidecar_path_of_index(p) for p in index.index_paths]
    digests = []
    for shard, side in zip(index.shards, sidecars, strict=True):
        meta = read_metadata(side)
        if not meta:
            raise IndexNotFoundError(
                f"dedup_threshold needs the embeddings of shard {shard} (looked for {side}): run "
                f"`rsprune-data index {shard} --centroids FILE --store-embeddings` first"
            )
        digests.append(meta["digest"])
    key = cache_key(digests, tau, index.centroids_digest)
    cached = [
        _read_cached(cache_path_of_index(p), key, int(starts[i + 1] - starts[i]))
        for i, p in enumerate(index.index_paths)
    ]
    if all(c is not None for c in cached):
        return np.concatenate([c for c in cached if c is not None])
    emb = load_embeddings(index)
    col = dedup.near_duplicates(emb, index.cluster_ids, index.similarity, tau, valid=index.valid)
    for i, p in enumerate(index.index_paths):
        _atomic_save(
            cache_path_of_index(p),
            {"dup_of": col[starts[i] : starts[i + 1]]},
            {
                "format": FORMAT_NAME,
                "version": FORMAT_VERSION,
                "key": key,
                "tau": repr(tau),
                "centroids_digest": index.centroids_digest,
            },
        )
    return col


def load_embeddings(index: PruneIndex) -> NDArray[Any]:
    """All stored embeddings of ``index`` in global order (float16 when every sidecar is float16)."""
    from . import index as idx

    parts: list[NDArray[Any]] = []
    for i, path in enumerate(index.index_paths):
        meta = idx.read_metadata(path)
        lo, hi = int(index.shard_starts[i]), int(index.shard_starts[i + 1])
        side = read_sidecar(sidecar_path_of_index(path), index_meta=meta, valid=index.valid[lo:hi])
        parts.append(side.tensors["embeddings"] if side.form == "float16" else side.embeddings())
    dtype = np.float16 if all(p.dtype == np.float16 for p in parts) else np.float32
    return np.concatenate([p.astype(dtype, copy=False) for p in parts])


__all__ = ["cache_key", "cache_path_of_index", "duplicate_of", "load_embeddings"]
