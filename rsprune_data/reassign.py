"""``rsprune-data reassign``: new centroids (another K, another reference set) without re-encoding.

Reads each shard's index and embeddings sidecar (:mod:`rsprune_data.embeddings`), recomputes
``z = argmax_k <e, mu_k>`` and ``s = <e, mu_z>`` for the new centroids, and rewrites the index
atomically with the new ``cluster_id``, ``similarity``, ``centroids_digest`` and ``num_clusters``; every
other column is kept as it was. No image is decoded and no encoder is loaded.

Exactness: from a ``float16`` sidecar the embeddings are the very numbers the indexer assigned from
(:func:`rsprune_data.embeddings.canonical`), multiplied by the same numpy product, so the result is
what a fresh ``rsprune-data index`` with the new centroids writes (same ids; cosines equal up to the
product's summation order). ``int8`` and ``pca`` sidecars give an approximation within their stored
cosine error (rows are renormalised after decoding).

The old index is replaced in place: nothing is lost, since the old assignment is ``reassign`` with
the old centroids. Shards are processed one at a time (memory: one shard's embeddings), and rank
``r`` of ``R`` (``--rank/--world-size`` or ``torchrun``'s environment) takes shards ``r, r + R, ...``
as ``index`` does.

Measured (``benchmarks/reassign_speed.py --repeats 5 --widen-variants --images``, d = 1280,
K = 200, 200k samples in 20 shards, quiet 2-core Xeon): 306k samples/s end to end (worst of 5:
283k), 5,457x re-encoding in the same run; K = 21: 656k/s. The float16 rows go to
:func:`rsprune_data.centroids.assign` as stored (no float32 copy of the shard, no copy of the
valid rows: invalid rows are zero and masked after).

Data flow per shard::

    <shard>.rsidx.safetensors -> read_index -> arrays [n], metadata
    <shard>.rsemb.safetensors -> read_sidecar (checked against the index) -> e [n, d] float16
      -> centroids.assign (chunks of ASSIGN_CHUNK rows widened to float32) -> z int16, s float32 [n]
      -> invalid rows: z = -1, s = 0
      -> write_index (atomic, same path)
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from . import index as idx
from .centroids import ASSIGN_CHUNK, assign
from .embeddings import read_metadata, read_sidecar, sidecar_path_of_index
from .errors import IndexMismatchError, IndexNotFoundError, RsPruneError, StaleIndexError
from .indexer import shard_share

if TYPE_CHECKING:
    from .centroids import Centroids


@dataclass
class ReassignReport:
    """What one reassign run did; ``ok`` is False when any shard failed."""

    reassigned: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    samples: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    def lines(self) -> list[str]:
        """A human summary, one line per fact."""
        out = [
            f"reassigned {len(self.reassigned)} shard(s) ({self.samples:,} samples) in "
            f"{self.seconds:.2f} s ({self.samples_per_second:,.0f} samples/s), "
            f"{len(self.failed)} failed"
        ]
        return out + [f"FAILED {shard}: {why}" for shard, why in self.failed.items()]


def _check_encoder(shard: str, index_path: os.PathLike[str] | str, centroids: Centroids) -> None:
    side = sidecar_path_of_index(index_path)
    meta = read_metadata(side)
    if not meta:
        raise IndexNotFoundError(
            f"no readable embeddings sidecar for shard {shard} (looked for {side}): index it once "
            "with `rsprune-data index SHARDS --centroids FILE --store-embeddings`"
        )
    if meta.get("encoder") != centroids.encoder:
        raise IndexMismatchError(
            f"shard {shard}'s embeddings come from encoder {meta.get('encoder')!r}, the centroids "
            f"from {centroids.encoder!r}: build the centroids with the same encoder "
            f"(`rsprune-data centroids REF_DIR --encoder {meta.get('encoder')} ...`)"
        )


def reassign_shard(
    shard: str,
    index_path: os.PathLike[str] | str,
    centroids: Centroids,
    *,
    chunk_size: int = ASSIGN_CHUNK,
    check_stale: bool = True,
) -> int:
    """Reassign one shard's index in place; returns its number of samples."""
    arrays, meta = idx.read_index(index_path)
    if check_stale and not idx.is_remote(shard):
        why = idx.shard_is_stale(shard, meta)
        if why:
            raise StaleIndexError(
                f"index {index_path} is stale: {why}; run `rsprune-data index "
                f"{shard} --centroids ... --store-embeddings` again"
            )
    valid = arrays["valid"] != 0
    side = read_sidecar(sidecar_path_of_index(index_path), index_meta=meta, valid=valid)
    if side.encoder != centroids.encoder or meta.get("encoder", "") not in ("", side.encoder):
        raise IndexMismatchError(
            f"shard {shard}: embeddings of {side.encoder!r}, index of "
            f"{meta.get('encoder')!r}, centroids of {centroids.encoder!r}: "
            "use centroids built with the indexing encoder"
        )
    if side.form == "float16":  # the stored rows as they are: widened chunk by chunk in assign
        emb = side.tensors["embeddings"]
    else:  # reconstructions of the reduced forms are not unit rows
        emb = side.embeddings()
        emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    # every row, invalid ones included (zero rows): cheaper than copying out the valid ones
    cluster, sim = assign(emb, centroids.centroids, chunk_size=chunk_size)
    cluster[~valid], sim[~valid] = -1, 0.0
    arrays = {**arrays, "cluster_id": cluster, "similarity": sim}
    meta = {
        **meta,
        "encoder": side.encoder,
        "centroids_digest": centroids.digest,
        "num_clusters": str(centroids.k),
    }
    idx.write_index(index_path, arrays, meta)
    return int(valid.shape[0])


def reassign_shards(
    shards: Sequence[str | os.PathLike[str]],
    centroids: Centroids,
    *,
    index_dir: str | os.PathLike[str] | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    chunk_size: int = ASSIGN_CHUNK,
    check_stale: bool = True,
    progress: bool = True,
) -> ReassignReport:
    """Reassign this rank's share of ``shards`` to ``centroids`` (see the module docstring).

    Args:
        shards: indexed tar shards (their indexes and sidecars beside them or under ``index_dir``).
        centroids: the new centroids; built with the encoder that wrote the sidecars.
        index_dir: where the indexes and sidecars are (default: beside each shard).
        rank, world_size: override the distributed rank (as :func:`rsprune_data.indexer.shard_share`).
        chunk_size: rows per matrix product.
        check_stale: refuse a local shard that changed since indexing (a ``stat``, no read).
        progress: a tqdm bar over shards.

    Returns:
        A :class:`ReassignReport`; a damaged or stale shard is listed there and the others proceed.

    Raises:
        IndexNotFoundError: a shard has no sidecar (before anything is written).
        IndexMismatchError: the sidecars' encoder is not the centroids' (before anything is written).

    Example:
        >>> reassign_shards(["s-000000.tar"], Centroids.load("aid_k100.safetensors"))  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    names = idx.expand_shards(shards)
    paths = [idx.index_path_for(s, index_dir) for s in names]
    idx.check_distinct_index_paths(names, paths)
    path_of = dict(zip(names, paths, strict=True))
    mine = [(s, path_of[s]) for s in shard_share(names, rank, world_size)]
    for shard, path in mine:  # refuse a wrong encoder before rewriting a single index
        if not path.exists():
            raise IndexNotFoundError(
                f"no index for shard {shard} (looked for {path}): run `rsprune-data index` first"
            )
        _check_encoder(shard, path, centroids)
    import torch  # noqa: F401  (assign widens float16 rows with it: imported before the clock starts)

    report = ReassignReport()
    t0 = time.perf_counter()
    for shard, path in tqdm(mine, unit="shard", desc="reassign", disable=not progress):
        try:
            report.samples += reassign_shard(
                shard, path, centroids, chunk_size=chunk_size, check_stale=check_stale
            )
            report.reassigned.append(shard)
        except (RsPruneError, OSError) as exc:
            report.failed[shard] = str(exc)
    report.seconds = time.perf_counter() - t0
    return report


__all__ = ["ReassignReport", "reassign_shard", "reassign_shards"]
