"""The offline indexer: tar shards -> one ``<shard>.rsidx.safetensors`` per shard.

Per sample, in tar order: entropy and no-data share (Stage I), nearest reference cluster and its
cosine similarity (Stage II), validity with a reason, byte range, key and a checksum of the byte
range. Everything expensive happens here, once; selection at load time only reads these arrays.

How the work flows (shapes between stages)::

    pending shards (this rank's share, not yet indexed)
      -> supervised worker processes, one shard at a time each (:mod:`rsprune_data._supervisor`):
         _index_work.shard_chunks -> chunks of SampleRow + images [m, 3, S, S] (m valid)
      -> main process: encoder.encode -> [m, d] -> embeddings.canonical (unit rows, float16)
         -> centroids.assign -> cluster id, similarity
      -> when a shard's last chunk arrives: write_sidecar (with --store-embeddings), then
         write_index (both atomic)

Clusters are assigned from the l2-normalised embedding rounded to float16
(:func:`rsprune_data.embeddings.canonical`), the same numbers a float16 sidecar stores, so
``rsprune-data reassign`` with these centroids gives back exactly these cluster ids.

Failures stay local: an image that cannot be decoded is an invalid sample with a reason; a shard
that cannot be indexed (damaged or forged tar headers, MemoryError, a worker killed by SIGKILL or
the OOM killer, ENOSPC/EROFS when writing its index, a shard replaced while it was read, anything
unexpected) is listed as FAILED with the reason in the summary and in :meth:`IndexReport.to_dict`
(``--report-json``), the other shards complete, and the CLI exits 1.

Resume: an index is written only when its shard is complete, atomically, so a killed run leaves
either a finished index or none; a rerun skips every shard whose index is current (same shard
size, mtime or fingerprint, encoder and centroids, format version) and so retries exactly the
failed and missing shards, with an identical result.
Consent: a run never replaces an index of another kind (other encoder, centroids or K, entropy-only
over embeddings, another entropy mode) unless ``overwrite=True`` (``--overwrite``); without it it
refuses before any work, naming what it would replace (:class:`~rsprune_data.errors.OverwriteError`).
Scale-out: rank ``r`` of ``R`` (``--rank/--world-size`` or ``torchrun``'s environment) takes shards
``r, r + R, ...`` of the list given, so ranks never share a shard and need no coordination.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from . import index as idx
from ._fsio import atomic_write_text
from ._index_work import META_PREFIX, NO_IMAGE, Job, SampleRow, describe, meta_values, shard_chunks
from ._supervisor import Died, supervised
from ._validate import check_int, check_rgb_bands
from .errors import ConfigError, IndexMismatchError, OverwriteError, StaleIndexError
from .images import CLOUD_VERSION, DEFAULT_DECODE_BUDGET
from .layout import EXTS_KEY, encode_members
from .reading import remote_metadata, shard_kind
from .world import distributed_rank

if TYPE_CHECKING:
    from .centroids import Centroids
    from .embeddings import PcaBasis
    from .encoders import Encoder

__all__ = [
    "CLOUD_COLUMN",
    "META_PREFIX",
    "NO_IMAGE",
    "IndexReport",
    "SampleRow",
    "check_meta_fields",
    "index_is_current",
    "index_shards",
    "meta_values",
    "shard_share",
]

ENTROPY_CHUNK = 2048  # samples per worker message when no encoder runs
REPORT_FORMAT = "rsprune-index-report"
CLOUD_COLUMN = "score.cloud"
_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")


@dataclass
class IndexReport:
    """What one indexing run did; ``ok`` is False when any shard failed.

    ``failed`` maps each failed shard to its reason; ``examples`` keeps, per invalid-sample
    reason, the first ``"shard key: message"`` seen, so a reason count can be traced to a file.
    """

    indexed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    samples: int = 0
    invalid: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    meta_missing: Counter[str] = field(default_factory=Counter)  # field -> samples without a number

    @property
    def ok(self) -> bool:
        return not self.failed

    def lines(self) -> list[str]:
        """A human summary, one line per fact."""
        out = [
            f"indexed {len(self.indexed)} shard(s) ({self.samples:,} samples), "
            f"skipped {len(self.skipped)} already current, {len(self.failed)} failed"
        ]
        if self.invalid:
            reasons = ", ".join(f"{r}: {c}" for r, c in sorted(self.invalid.items()))
            out.append(
                f"invalid samples (never selected): {sum(self.invalid.values())} ({reasons})"
            )
        if self.meta_missing:
            missing = ", ".join(f"{f}: {c}" for f, c in sorted(self.meta_missing.items()))
            out.append(f"metadata fields missing or not numeric (stored as NaN): {missing}")
        out += [f"FAILED {shard}: {why}" for shard, why in self.failed.items()]
        if self.failed:
            out.append(
                f"FAILED {len(self.failed)} shard(s); rerun the same command to retry "
                "exactly those (current indexes are skipped)"
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data (what ``--report-json`` writes)."""
        return {
            "format": REPORT_FORMAT,
            "version": 1,
            "ok": self.ok,
            "indexed": list(self.indexed),
            "skipped": list(self.skipped),
            "failed": [{"shard": s, "reason": r} for s, r in self.failed.items()],
            "samples": self.samples,
            "invalid": dict(sorted(self.invalid.items())),
            "invalid_examples": dict(sorted(self.examples.items())),
            "meta_missing": dict(sorted(self.meta_missing.items())),
        }

    def write_json(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_dict` to ``path`` atomically (temp file, fsync, rename)."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")


def check_meta_fields(fields: Sequence[str] | str) -> tuple[str, ...]:
    """``fields`` (a list, or one comma-separated string) as distinct, valid field names."""
    items = fields.split(",") if isinstance(fields, str) else list(fields)
    out = tuple(f.strip() for f in items if not isinstance(f, str) or f.strip())
    bad = [f for f in out if not isinstance(f, str) or not _FIELD.fullmatch(f)]
    if bad or len(set(out)) < len(out):
        raise ConfigError(
            f"`meta_fields` must be distinct field names (letters, digits, _ . -) "
            f"such as 'cloud_cover,gsd', got {list(items)!r}"
        )
    return out


def shard_share(
    shards: Sequence[str], rank: int | None = None, world_size: int | None = None
) -> list[str]:
    """This rank's shards: ``shards[rank::world_size]`` (explicit values beat torchrun's env)."""
    r, size = distributed_rank(rank, world_size)
    return list(shards[r::size])


# --- what kind of index a run writes, and what is on disk ----------------------------------------
def _kind(meta: dict[str, str]) -> dict[str, str]:
    """The fields that make two indexes of one shard interchangeable (others may extend it)."""
    return {
        "encoder": meta.get("encoder", ""),
        "centroids_digest": meta.get("centroids_digest", ""),
        "num_clusters": meta.get("num_clusters", "0"),
        "entropy_mode": meta.get("entropy_mode", "exact"),
    }


def _describe_kind(kind: dict[str, str]) -> str:
    if not kind.get("centroids_digest"):
        return f"entropy-only ({kind.get('entropy_mode', 'exact')})"
    return (
        f"encoder {kind['encoder']!r}, centroids {kind['centroids_digest']}, "
        f"K={kind['num_clusters']}"
    )


def _existing_kind(path: Path) -> dict[str, str] | None:
    """The kind of the index at ``path``; None when there is none worth keeping (absent, partial)."""
    from safetensors import SafetensorError, safe_open

    if not path.exists():
        return None
    try:
        with safe_open(path, framework="np") as f:
            meta = dict(f.metadata() or {})
    except (OSError, SafetensorError):
        return None  # unreadable or cut short: nothing usable to lose
    if meta.get("format") != idx.FORMAT_NAME or meta.get("version") not in idx.READABLE_VERSIONS:
        return {"format": f"{meta.get('format')!r} version {meta.get('version')!r}"}
    return _kind(meta)


def _check_overwrite(todo: list[tuple[str, Path]], ours: dict[str, str]) -> None:
    clashes = [(out, k) for _, out in todo if (k := _existing_kind(out)) is not None and k != ours]
    if not clashes:
        return
    shown = "; ".join(
        f"{out} ({k['format'] if 'format' in k else _describe_kind(k)})" for out, k in clashes[:3]
    )
    more = f" and {len(clashes) - 3} more" if len(clashes) > 3 else ""
    raise OverwriteError(
        f"indexing would replace {len(clashes)} index(es) of another kind with "
        f"{_describe_kind(ours)} indexes: {shown}{more}. Pass --overwrite (overwrite=True) to "
        "replace them, --index-dir DIR to write the new indexes elsewhere, or the same "
        "--centroids/--encoder to keep them"
    )


def index_is_current(
    shard: str,
    index_path: Path,
    *,
    encoder: str,
    centroids_digest: str,
    entropy_mode: str = "exact",
    columns: Sequence[str] | None = None,
    image_key: str = "",
    storage_options: dict[str, Any] | None = None,
) -> bool:
    """True when ``index_path`` is a complete index of ``shard`` as it is now, for these centroids
    (and, when ``columns`` is given, with exactly these optional columns and image key)."""
    if not index_path.exists():
        return False
    try:
        meta = idx.read_metadata(index_path)
    except (OSError, ValueError):
        return False  # unreadable or partial: index again
    if meta.get("format") != idx.FORMAT_NAME or meta.get("version") != idx.FORMAT_VERSION:
        return False
    if meta.get("encoder", "") != encoder or meta.get("centroids_digest", "") != centroids_digest:
        return False
    if meta.get("entropy_mode", "exact") != entropy_mode:
        return False
    if columns is not None:
        try:
            have = json.loads(meta.get(idx.COLUMNS_KEY, "{}"))
        except ValueError:
            return False
        if sorted(have) != sorted(columns) or meta.get("image_key", "") != image_key:
            return False
    if shard_kind(shard) == "remote":  # one HEAD/stat: same size and store checksum
        now = remote_metadata(shard, storage_options)
        return all(now[k] == meta.get(k) for k in ("shard_size", "shard_fingerprint"))
    return not idx.shard_is_stale(shard, meta)


def _sidecar_current(
    shard: str, out: Path, encoder: str, store: tuple[str, PcaBasis | None]
) -> bool:
    from .embeddings import sidecar_is_current, sidecar_path_of_index

    form, basis = store
    return sidecar_is_current(
        shard,
        sidecar_path_of_index(out),
        encoder=encoder,
        form=form,
        pca_digest=basis.digest if form == "pca" and basis is not None else "",
    )


# --- writing one shard's index ---------------------------------------------------------------------
@dataclass
class _Pending:
    rows: list[SampleRow] = field(default_factory=list)
    cluster: list[NDArray[np.int16]] = field(default_factory=list)
    similarity: list[NDArray[np.float32]] = field(default_factory=list)
    embeddings: list[NDArray[np.float16]] = field(default_factory=list)


def _finish(
    shard: str,
    out: Path,
    pending: _Pending,
    before: dict[str, str],
    *,
    encoder_id: str,
    centroids: Centroids | None,
    entropy_mode: str,
    optional: Sequence[tuple[str, dict[str, str]]] = (),
    image_key: str = "",
    missing: Counter[str] | None = None,
    store: tuple[str, PcaBasis | None] | None = None,
) -> Counter[str]:
    rows = pending.rows
    n = len(rows)
    # a URL shard was checked by the worker right after its pass (one HEAD); a local one again here
    why = None if shard_kind(shard) == "remote" else idx.shard_is_stale(shard, before)
    if why:  # changed after the worker's own check, before the index is written
        raise StaleIndexError(f"{why} while being indexed: run `rsprune-data index` again")
    reasons = Counter(r.reason for r in rows if r.reason)
    reason_names = sorted(reasons)
    code = {name: i + 1 for i, name in enumerate(reason_names)}
    valid = np.array([not r.reason for r in rows], dtype=bool)
    cluster = np.full(n, -1, dtype=np.int16)
    sim = np.zeros(n, dtype=np.float32)
    if centroids is not None and pending.cluster:
        cluster[valid] = np.concatenate(pending.cluster)
        sim[valid] = np.concatenate(pending.similarity)
    if store is not None and centroids is not None:
        from .embeddings import sidecar_path_of_index, write_sidecar

        emb = np.zeros((n, centroids.dim), np.float32)
        if pending.embeddings:
            emb[valid] = np.concatenate(pending.embeddings)
        # the sidecar first: an index that is current then always has its sidecar written
        write_sidecar(
            sidecar_path_of_index(out),
            emb,
            valid,
            shard_meta=before,
            encoder=encoder_id,
            form=store[0],
            basis=store[1],
        )
    arrays = {
        "entropy": np.array([r.entropy for r in rows], dtype=np.float32),
        "nodata": np.array([r.nodata for r in rows], dtype=np.float32),
        "cluster_id": cluster,
        "similarity": sim,
        "valid": valid.astype(np.uint8),
        "reason": np.array([code.get(r.reason, 0) for r in rows], dtype=np.uint8),
        "offset": np.array([r.offset for r in rows], dtype=np.int64),
        "length": np.array([r.length for r in rows], dtype=np.int64),
        "checksum": np.array([r.checksum for r in rows], dtype=np.uint64),
        **idx.encode_keys([r.key for r in rows]),
    }
    infos: dict[str, dict[str, str]] = {}
    for j, (name, info) in enumerate(optional):
        col = np.array([r.extras[j] for r in rows], dtype=np.float32).reshape(n)
        arrays[name], infos[name] = col, info
        lacking = int(np.isnan(col).sum())
        if missing is not None and name.startswith(META_PREFIX) and lacking:
            missing[name.removeprefix(META_PREFIX)] += lacking
    layout = encode_members([r.members for r in rows], [r.offset for r in rows])
    if layout is not None:
        arrays.update(layout[0])
    meta = {
        **before,
        "encoder": encoder_id,
        "centroids_digest": centroids.digest if centroids is not None else "",
        "num_clusters": str(centroids.centroids.shape[0] if centroids is not None else 0),
        "num_samples": str(n),
        "reasons": json.dumps(reason_names),
        "entropy_mode": entropy_mode,
    }
    if infos:
        meta[idx.COLUMNS_KEY] = json.dumps(infos, sort_keys=True)
    if image_key:
        meta["image_key"] = image_key
    if layout is not None:
        meta[EXTS_KEY] = layout[1]
    idx.write_index(out, arrays, meta)
    return reasons


def _is_last(chunk: Any) -> bool:
    return bool(chunk["done"])


def _run(job: Job, numbers: list[int], workers: int) -> Iterator[dict[str, Any]]:
    """Chunks of every shard in ``numbers``; a dead worker's shard ends with an error chunk."""
    if workers == 0:
        for no in numbers:
            yield from shard_chunks(job, no)
        return
    for no, msg in supervised(shard_chunks, job, numbers, workers, _is_last):
        if isinstance(msg, Died):
            yield {
                "shard": no,
                "rows": [],
                "images": None,
                "examples": {},
                "done": True,
                "error": msg.reason(),
                "meta": None,
            }
        else:
            yield msg


def index_shards(
    shards: Sequence[str | os.PathLike[str]],
    *,
    centroids: Centroids | None = None,
    encoder: Encoder | None = None,
    index_dir: str | os.PathLike[str] | None = None,
    workers: int = 2,
    batch_size: int = 64,
    rank: int | None = None,
    world_size: int | None = None,
    rgb_bands: tuple[int, int, int] = (0, 1, 2),
    force: bool = False,
    overwrite: bool = False,
    fast_gray: bool = False,
    decode_budget: int | None = DEFAULT_DECODE_BUDGET,
    image_key: str | None = None,
    meta_fields: Sequence[str] = (),
    cloud_score: bool | None = None,
    store_embeddings: str | None = None,
    pca_basis: PcaBasis | None = None,
    progress: bool = True,
    storage_options: dict[str, Any] | None = None,
) -> IndexReport:
    """Index this rank's share of ``shards`` (see the module docstring).

    Args:
        shards: tar shards (local paths or fsspec URLs: ``https://``, ``s3://``, ...), in the
            order that defines global positions. URL shards are read in one sequential pass and
            need ``index_dir``; their fingerprint is the store's checksum (ETag) where it offers
            one (:func:`rsprune_data.reading.remote_metadata`).
        centroids: reference centroids; ``None`` writes entropy-only indexes (no Stage II).
        encoder: the encoder the centroids were built with (required with ``centroids``).
        index_dir: where to write indexes (default: beside each shard).
        workers: supervised worker processes decoding images (0 = in this process, where a
            killed decoder takes the run with it).
        batch_size: samples per chunk, and so per encoder batch (entropy-only indexes send at
            least :data:`ENTROPY_CHUNK` samples per chunk).
        rank, world_size: override the distributed rank (see :func:`shard_share`).
        rgb_bands: the bands that make RGB for the encoder in multi-band GeoTIFFs.
        force: index again even when an index is current.
        overwrite: allow replacing indexes of another kind (other encoder, centroids, K or
            entropy mode); without it such a run raises before any work.
        fast_gray: entropy-only indexes: decode JPEGs straight to libjpeg's Y channel, about 2x
            faster but not equal to PIL's luma (see :mod:`rsprune_data.images`); recorded in the
            index metadata as ``entropy_mode``. Ignored with centroids (the RGB decode is needed).
        decode_budget: bytes of decoded raster per image (``images.DEFAULT_DECODE_BUDGET``);
            larger images are decoded at reduced resolution or recorded as ``too_large``.
        image_key: the member that holds the image (``"img_content"``), decoded by its bytes;
            default: the first member with an image or ``.npy`` extension.
        meta_fields: numeric fields of each sample's ``.json`` member to store as ``meta.<field>``
            columns (NaN where missing), for ``PruneConfig(where=...)``.
        cloud_score: store the pixel cloud/haze score as ``score.cloud`` (never with
            ``fast_gray``: it needs colour). Default ``None``: with centroids, where it costs a
            few percent of the encoder's time; entropy-only indexes skip it unless ``True``
            (there it costs about as much as the decode and entropy: see
            ``benchmarks/indexer_throughput.py --cloud-only``).
        store_embeddings: also write each shard's embeddings sidecar in this form
            (``"float16"``, ``"int8"`` or ``"pca"``, see :mod:`rsprune_data.embeddings`); needs
            ``centroids``. A shard whose index is current but whose sidecar is missing or of
            another form is indexed again.
        pca_basis: the basis of the ``"pca"`` form (:func:`rsprune_data.embeddings.fit_pca`).
        progress: show a tqdm bar over samples.
        storage_options: fsspec options for URL shards (credentials, endpoint, ...).

    Returns:
        An :class:`IndexReport`; corrupt images are counted there, failed shards listed by name
        with their reason.

    Raises:
        OverwriteError: indexes of another kind would be replaced and ``overwrite`` is False.
        IndexMismatchError, ConfigError: bad arguments (before any work).
    """
    import torch
    from tqdm.auto import tqdm

    from .centroids import assign
    from .embeddings import canonical

    if centroids is not None:
        if encoder is None:
            raise IndexMismatchError(
                "`encoder` is required with `centroids`: pass the encoder the "
                f"centroids were built with ({centroids.encoder!r})"
            )
        if encoder.name != centroids.encoder:
            raise IndexMismatchError(
                f"encoder {encoder.name!r} differs from the centroids' encoder {centroids.encoder!r}: "
                "pass the same --encoder/--checkpoint the centroids were built with"
            )
    if store_embeddings is not None:
        from .embeddings import FORMS

        if store_embeddings not in FORMS:
            raise ConfigError(
                f"`store_embeddings` must be one of {list(FORMS)} or None, got {store_embeddings!r}"
            )
        if centroids is None:
            raise ConfigError(
                "store_embeddings needs centroids (embeddings are computed only for "
                "Stage II): pass --centroids FILE"
            )
        if store_embeddings == "pca" and pca_basis is None:
            raise ConfigError(
                "store_embeddings='pca' needs pca_basis (--pca-basis FILE): fit one "
                "with rsprune_data.embeddings.fit_pca on a sample of embeddings"
            )
    store = None if store_embeddings is None else (store_embeddings, pca_basis)
    workers = check_int("workers", workers, 0)
    batch_size = check_int("batch_size", batch_size, 1)
    rgb_bands = check_rgb_bands(rgb_bands)  # here, not in a decoding worker
    if decode_budget is not None:
        decode_budget = check_int("decode_budget", decode_budget, 1)
    fields_ = check_meta_fields(meta_fields)
    if image_key is not None and (
        not isinstance(image_key, str) or not image_key or image_key.startswith("_")
    ):
        raise ConfigError(
            f"`image_key` must be a member name such as 'img_content' or "
            f"'rgb.npy', got {image_key!r}"
        )
    names = idx.expand_shards(shards)
    streams = [s for s in names if shard_kind(s) == "stream"]
    if streams:
        raise ConfigError(
            f"cannot index the stream {streams[0]!r}: pass the URL it reads "
            "(https://, s3://, ... with --storage-options) or a local path"
        )
    idx.check_distinct_index_paths(names, [idx.index_path_for(s, index_dir) for s in names])
    encoder_id = encoder.name if (encoder is not None and centroids is not None) else ""
    digest = centroids.digest if centroids is not None else ""
    fast_gray = fast_gray and centroids is None
    mode = "fast_gray" if fast_gray else "exact"
    cloud = (centroids is not None if cloud_score is None else bool(cloud_score)) and not fast_gray
    optional = (
        [(CLOUD_COLUMN, idx.column_info("pixels:cloud_score", CLOUD_VERSION))] if cloud else []
    )
    optional += [(META_PREFIX + f, idx.column_info(f"json:{f}")) for f in fields_]
    wanted = [name for name, _ in optional]
    report = IndexReport()
    todo: list[tuple[str, Path]] = []
    for shard in shard_share(names, rank, world_size):
        out = idx.index_path_for(shard, index_dir)
        if (
            not force
            and index_is_current(
                shard,
                out,
                encoder=encoder_id,
                centroids_digest=digest,
                entropy_mode=mode,
                columns=wanted,
                image_key=image_key or "",
                storage_options=storage_options,
            )
            and (store is None or _sidecar_current(shard, out, encoder_id, store))
        ):
            report.skipped.append(shard)
        else:
            todo.append((shard, out))
    if not overwrite:
        k = centroids.centroids.shape[0] if centroids is not None else 0
        _check_overwrite(
            todo,
            {
                "encoder": encoder_id,
                "centroids_digest": digest,
                "num_clusters": str(k),
                "entropy_mode": mode,
            },
        )
    ready: list[tuple[str, Path]] = []
    for shard, out in todo:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            idx.remove_stale_temporaries(out)
        except OSError as exc:  # a read-only or missing index folder fails this shard, by name
            report.failed[shard] = f"cannot prepare its index folder {out.parent}: {describe(exc)}"
            continue
        ready.append((shard, out))
    if not ready:
        return report
    preprocess = encoder.preprocess if centroids is not None and encoder is not None else None
    # entropy-only chunks carry no images: large chunks keep the per-chunk IPC off the hot path
    chunk_size = batch_size if preprocess is not None else max(batch_size, ENTROPY_CHUNK)
    job = Job(
        tuple(s for s, _ in ready),
        chunk_size,
        preprocess,
        rgb_bands,
        fast_gray,
        decode_budget,
        image_key,
        fields_,
        cloud,
        storage_options,
    )
    pending: dict[int, _Pending] = {}
    broken: set[int] = (
        set()
    )  # shards whose main-process work failed; their later chunks are dropped
    bar = tqdm(total=None, unit="img", desc=f"index 0/{len(ready)} shards", disable=not progress)
    for chunk in _run(job, list(range(len(ready))), min(workers, len(ready))):
        no = chunk["shard"]
        shard, out = ready[no]
        bar.update(len(chunk["rows"]))
        if no in broken:
            continue
        p = pending.setdefault(no, _Pending())
        try:
            p.rows.extend(chunk["rows"])
            for reason, example in chunk["examples"].items():
                report.examples.setdefault(reason, f"{shard} {example}")
            if chunk["images"] is not None and centroids is not None and encoder is not None:
                emb = canonical(encoder.encode(torch.from_numpy(chunk["images"])))
                # numpy on the CPU, as `reassign` does: the same representation and the same product
                z, s = assign(emb.astype(np.float32), centroids.centroids)
                if store is not None:
                    p.embeddings.append(emb)
                p.cluster.append(z)
                p.similarity.append(s)
            if chunk["done"]:
                del pending[no]
                if chunk["error"]:
                    report.failed[shard] = chunk["error"]
                else:
                    report.invalid += _finish(
                        shard,
                        out,
                        p,
                        chunk["meta"],
                        encoder_id=encoder_id,
                        centroids=centroids,
                        entropy_mode=mode,
                        optional=optional,
                        image_key=image_key or "",
                        missing=report.meta_missing,
                        store=store,
                    )
                    report.indexed.append(shard)
                    report.samples += len(p.rows)
        except Exception as exc:  # ENOSPC/EROFS writing the index, an encoder error: this shard
            pending.pop(no, None)
            if not chunk["done"]:
                broken.add(no)
            report.failed[shard] = describe(exc)
        bar.set_description(f"index {len(report.indexed) + len(report.failed)}/{len(ready)} shards")
    bar.close()
    report.failed = {s: report.failed[s] for s in names if s in report.failed}  # in shard order
    return report
