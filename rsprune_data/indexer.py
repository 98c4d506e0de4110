"""The offline indexer: tar shards -> one ``<shard>.rsidx.safetensors`` per shard.

Per sample, in tar order: entropy and no-data share (Stage I), nearest reference cluster and its
cosine similarity (Stage II), validity with a reason, byte range and key; optional columns: the
pixel cloud/haze score ``score.cloud`` (:func:`rsprune_data.images.cloud_score`) and numeric
fields of the sample's ``.json`` member as ``meta.<field>`` (``meta_fields``; NaN where a sample
lacks the field or it is not a number, counted in the report). Everything expensive happens here,
once; selection at load time only reads these arrays.

How the work flows (shapes between stages)::

    pending shards (this rank's share, not yet indexed)
      -> DataLoader workers, one shard at a time each:
         iter_tar_samples -> (TarSample, {ext: bytes})
         -> images.pick_image_member(image_key) -> images.analyze -> entropy, nodata, cloud, rgb
            | CorruptImageError(reason); the .json member -> meta values
         -> encoder.preprocess(rgb) -> [3, S, S]
         chunks of <= batch_size samples: arrays [n] + images [m, 3, S, S] (m valid)
      -> main process: encoder.encode -> [m, d]; centroids.assign -> cluster id, similarity
      -> when a shard's last chunk arrives: write_index (atomic)

Resume: an index is written only when its shard is complete, atomically, so a killed run leaves
either a finished index or none; a rerun skips every shard whose index is current (same shard
size, mtime or fingerprint, encoder and centroids) and gives an identical result.
Scale-out: rank ``r`` of ``R`` (``--rank/--world-size`` or ``torchrun``'s environment) takes shards
``r, r + R, ...`` of the list given, so ranks never share a shard and need no coordination.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray
from torch.utils.data import IterableDataset

from . import index as idx
from ._validate import check_int
from .errors import ConfigError, CorruptImageError, IndexMismatchError, ShardError
from .images import CLOUD_VERSION, analyze, pick_image_member
from .tario import iter_tar_samples
from .world import distributed_rank

if TYPE_CHECKING:
    from .centroids import Centroids
    from .encoders import Encoder

NO_IMAGE = "no_image"
ENTROPY_CHUNK = 2048  # samples per worker message when no encoder runs
CLOUD_COLUMN = "score.cloud"
_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
META_PREFIX = "meta."
# a row per sample: key, offset, length, entropy, nodata, reason, (cloud, *meta values)
_Row = tuple[str, int, int, float, float, str, tuple[float, ...]]


@dataclass
class IndexReport:
    """What one indexing run did; ``ok`` is False when any shard failed."""

    indexed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    samples: int = 0
    invalid: Counter[str] = field(default_factory=Counter)
    meta_missing: Counter[str] = field(default_factory=Counter)  # field -> samples without a number

    @property
    def ok(self) -> bool:
        return not self.failed

    def lines(self) -> list[str]:
        """A human summary, one line per fact."""
        out = [f"indexed {len(self.indexed)} shard(s) ({self.samples:,} samples), "
               f"skipped {len(self.skipped)} already current, {len(self.failed)} failed"]
        if self.invalid:
            reasons = ", ".join(f"{r}: {c}" for r, c in sorted(self.invalid.items()))
            out.append(f"invalid samples (never selected): {sum(self.invalid.values())} ({reasons})")
        if self.meta_missing:
            missing = ", ".join(f"{f}: {c}" for f, c in sorted(self.meta_missing.items()))
            out.append(f"metadata fields missing or not numeric (stored as NaN): {missing}")
        out += [f"FAILED {shard}: {why}" for shard, why in self.failed.items()]
        return out


def check_meta_fields(fields: Sequence[str] | str) -> tuple[str, ...]:
    """``fields`` (a list, or one comma-separated string) as distinct, valid field names."""
    items = fields.split(",") if isinstance(fields, str) else list(fields)
    out = tuple(f.strip() for f in items if not isinstance(f, str) or f.strip())
    bad = [f for f in out if not isinstance(f, str) or not _FIELD.fullmatch(f)]
    if bad or len(set(out)) < len(out):
        raise ConfigError(f"`meta_fields` must be distinct field names (letters, digits, _ . -) "
                          f"such as 'cloud_cover,gsd', got {list(items)!r}")
    return out


def shard_share(shards: Sequence[str], rank: int | None = None,
                world_size: int | None = None) -> list[str]:
    """This rank's shards: ``shards[rank::world_size]`` (explicit values beat torchrun's env)."""
    r, size = distributed_rank(rank, world_size)
    return list(shards[r::size])


@dataclass(frozen=True)
class _Job:
    """The picklable part of the work, shipped to DataLoader workers."""

    shards: tuple[str, ...]
    batch_size: int
    preprocess: Any  # encoder.preprocess (an ImageTransform) or None for entropy only
    rgb_bands: tuple[int, int, int]
    fast_gray: bool = False
    image_key: str | None = None
    meta_fields: tuple[str, ...] = ()
    cloud: bool = False


def _analyze_one(job: _Job, sample: dict[str, bytes]) -> tuple[float, float, float, Any]:
    picked = pick_image_member(sample, job.image_key)
    if picked is None:
        what = f"no {job.image_key!r} member" if job.image_key else "no image member"
        raise CorruptImageError(f"sample has {what}", reason=NO_IMAGE)
    name, data = picked
    st = analyze(data, name if job.image_key is None else None,
                 want_rgb=job.preprocess is not None, want_cloud=job.cloud,
                 rgb_bands=job.rgb_bands, fast_gray=job.fast_gray)
    image = job.preprocess(st.rgb) if job.preprocess is not None else None
    return st.entropy, st.nodata, st.cloud, image


def meta_values(sample: dict[str, bytes], fields: Sequence[str]) -> tuple[float, ...]:
    """The numeric ``fields`` of a sample's ``.json`` member (``json`` or ``*.json``), NaN where
    missing or not a number. A dotted field (``"geo.gsd"``) also looks into nested objects;
    numbers written as strings (``"0.5"``) count, booleans are 1 or 0."""
    if not fields:
        return ()
    raw = sample.get("json")
    if raw is None:
        raw = next((v for k, v in sample.items() if k.endswith(".json")), None)
    try:
        doc = json.loads(raw) if raw is not None else None
    except (ValueError, UnicodeDecodeError):
        doc = None
    return tuple(_number(_lookup(doc, f)) for f in fields)


def _lookup(doc: Any, name: str) -> Any:
    if not isinstance(doc, dict):
        return None
    if name in doc:
        return doc[name]
    head, _, rest = name.partition(".")
    return _lookup(doc.get(head), rest) if rest else None


def _number(v: Any) -> float:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, int | float):
        return float(v) if math.isfinite(v) else math.nan
    if isinstance(v, str):
        try:
            x = float(v)
        except ValueError:
            return math.nan
        return x if math.isfinite(x) else math.nan
    return math.nan


def _chunks(job: _Job, shard_no: int) -> Iterator[dict[str, Any]]:
    """Chunks of one shard (see the module docstring); the last has ``done=True``."""
    import torch

    rows: list[_Row] = []
    images: list[Any] = []
    start = 0

    def flush(done: bool, error: str | None = None) -> dict[str, Any]:
        nonlocal rows, images, start
        chunk = {"shard": shard_no, "start": start, "rows": rows, "done": done, "error": error,
                 "images": torch.stack(images) if images else None}
        start += len(rows)
        rows, images = [], []
        return chunk

    try:
        for ts, sample in iter_tar_samples(job.shards[shard_no]):
            try:
                ent, nod, cloud, image = _analyze_one(job, sample)
                reason = ""
                if image is not None:
                    images.append(image)
            except CorruptImageError as exc:
                ent, nod, cloud, reason = 0.0, 0.0, math.nan, exc.reason
            extras = ((cloud,) if job.cloud else ()) + meta_values(sample, job.meta_fields)
            rows.append((ts.key, ts.offset, ts.length, ent, nod, reason, extras))
            if len(rows) >= job.batch_size:
                yield flush(False)
    except (ShardError, OSError) as exc:
        yield flush(True, str(exc))
        return
    yield flush(True)


class _ShardStream(IterableDataset[dict[str, Any]]):
    """IterableDataset of chunks; worker ``w`` of ``W`` takes shards ``w, w + W, ...``."""

    def __init__(self, job: _Job) -> None:
        super().__init__()
        self.job = job

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from .world import worker_info

        w, nw = worker_info()
        for shard_no in range(w, len(self.job.shards), nw):
            yield from _chunks(self.job, shard_no)


def _identity(x: Any) -> Any:
    return x


def index_is_current(shard: str, index_path: Path, *, encoder: str, centroids_digest: str,
                     entropy_mode: str = "exact", columns: Sequence[str] | None = None,
                     image_key: str = "") -> bool:
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
    return not idx.shard_is_stale(shard, meta)


@dataclass
class _Pending:
    rows: list[_Row] = field(default_factory=list)
    cluster: list[NDArray[np.int16]] = field(default_factory=list)
    similarity: list[NDArray[np.float32]] = field(default_factory=list)


def _finish(shard: str, out: Path, pending: _Pending, *, encoder_id: str,
            centroids: Centroids | None, entropy_mode: str,
            optional: Sequence[tuple[str, dict[str, str]]] = (), image_key: str = "",
            missing: Counter[str] | None = None) -> Counter[str]:
    rows = pending.rows
    n = len(rows)
    reasons = Counter(r[5] for r in rows if r[5])
    reason_names = sorted(reasons)
    code = {name: i + 1 for i, name in enumerate(reason_names)}
    valid = np.array([not r[5] for r in rows], dtype=bool)
    cluster = np.full(n, -1, dtype=np.int16)
    sim = np.zeros(n, dtype=np.float32)
    if centroids is not None and pending.cluster:
        cluster[valid] = np.concatenate(pending.cluster)
        sim[valid] = np.concatenate(pending.similarity)
    keys = [r[0] for r in rows]
    arrays = {
        "entropy": np.array([r[3] for r in rows], dtype=np.float32),
        "nodata": np.array([r[4] for r in rows], dtype=np.float32),
        "cluster_id": cluster,
        "similarity": sim,
        "valid": valid.astype(np.uint8),
        "reason": np.array([code.get(r[5], 0) for r in rows], dtype=np.uint8),
        "offset": np.array([r[1] for r in rows], dtype=np.int64),
        "length": np.array([r[2] for r in rows], dtype=np.int64),
        **idx.encode_keys(keys),
    }
    infos: dict[str, dict[str, str]] = {}
    for j, (name, info) in enumerate(optional):
        col = np.array([r[6][j] for r in rows], dtype=np.float32).reshape(n)
        arrays[name], infos[name] = col, info
        lacking = int(np.isnan(col).sum())
        if missing is not None and name.startswith(META_PREFIX) and lacking:
            missing[name.removeprefix(META_PREFIX)] += lacking
    meta = {
        **idx.shard_metadata(shard),
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
    idx.write_index(out, arrays, meta)
    return reasons


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
    fast_gray: bool = False,
    image_key: str | None = None,
    meta_fields: Sequence[str] = (),
    cloud_score: bool | None = None,
    progress: bool = True,
) -> IndexReport:
    """Index this rank's share of ``shards`` (see the module docstring).

    Args:
        shards: local tar shards, in the order that defines global positions.
        centroids: reference centroids; ``None`` writes entropy-only indexes (no Stage II).
        encoder: the encoder the centroids were built with (required with ``centroids``).
        index_dir: where to write indexes (default: beside each shard).
        workers: DataLoader worker processes decoding images (0 = in this process).
        batch_size: samples per chunk, and so per encoder batch (entropy-only indexes send at
            least :data:`ENTROPY_CHUNK` samples per chunk).
        rank, world_size: override the distributed rank (see :func:`shard_share`).
        rgb_bands: the bands that make RGB for the encoder in multi-band GeoTIFFs.
        force: index again even when an index is current.
        fast_gray: entropy-only indexes: decode JPEGs straight to libjpeg's Y channel, about 2x
            faster but not equal to PIL's luma (see :mod:`rsprune_data.images`); recorded in the
            index metadata as ``entropy_mode``. Ignored with centroids (the RGB decode is needed).
        image_key: the member that holds the image (``"img_content"``), decoded by its bytes;
            default: the first member with an image or ``.npy`` extension.
        meta_fields: numeric fields of each sample's ``.json`` member to store as ``meta.<field>``
            columns (NaN where missing), for ``PruneConfig(where=...)``.
        cloud_score: store the pixel cloud/haze score as ``score.cloud`` (never with
            ``fast_gray``: it needs colour). Default ``None``: with centroids, where it costs a
            few percent of the encoder's time; entropy-only indexes skip it unless ``True``
            (there it costs about as much as the decode and entropy: see
            ``benchmarks/indexer_throughput.py --cloud-only``).
        progress: show a tqdm bar over samples.

    Returns:
        An :class:`IndexReport`; corrupt images are counted there, failed shards listed by name.
    """
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from .centroids import assign

    if centroids is not None:
        if encoder is None:
            raise IndexMismatchError("`encoder` is required with `centroids`: pass the encoder the "
                                     f"centroids were built with ({centroids.encoder!r})")
        if encoder.name != centroids.encoder:
            raise IndexMismatchError(
                f"encoder {encoder.name!r} differs from the centroids' encoder {centroids.encoder!r}: "
                "pass the same --encoder/--checkpoint the centroids were built with"
            )
    workers = check_int("workers", workers, 0)
    batch_size = check_int("batch_size", batch_size, 1)
    fields_ = check_meta_fields(meta_fields)
    if image_key is not None and (not isinstance(image_key, str) or not image_key
                                  or image_key.startswith("_")):
        raise ConfigError(f"`image_key` must be a member name such as 'img_content' or "
                          f"'rgb.npy', got {image_key!r}")
    names = [os.fspath(s) for s in shards]
    idx.check_distinct_index_paths(names, [idx.index_path_for(s, index_dir) for s in names])
    encoder_id = encoder.name if (encoder is not None and centroids is not None) else ""
    digest = centroids.digest if centroids is not None else ""
    fast_gray = fast_gray and centroids is None
    mode = "fast_gray" if fast_gray else "exact"
    cloud = (centroids is not None if cloud_score is None else bool(cloud_score)) and not fast_gray
    optional = ([(CLOUD_COLUMN, idx.column_info("pixels:cloud_score", CLOUD_VERSION))]
                if cloud else [])
    optional += [(META_PREFIX + f, idx.column_info(f"json:{f}")) for f in fields_]
    wanted = [name for name, _ in optional]
    report = IndexReport()
    todo: list[tuple[str, Path]] = []
    for shard in shard_share(names, rank, world_size):
        out = idx.index_path_for(shard, index_dir)
        if not force and index_is_current(shard, out, encoder=encoder_id, centroids_digest=digest,
                                          entropy_mode=mode, columns=wanted,
                                          image_key=image_key or ""):
            report.skipped.append(shard)
        else:
            todo.append((shard, out))
    if not todo:
        return report
    for _, out in todo:
        out.parent.mkdir(parents=True, exist_ok=True)
        idx.remove_stale_temporaries(out)
    preprocess = encoder.preprocess if centroids is not None and encoder is not None else None
    # entropy-only chunks carry no images: large chunks keep the per-chunk IPC off the hot path
    chunk = batch_size if preprocess is not None else max(batch_size, ENTROPY_CHUNK)
    job = _Job(tuple(s for s, _ in todo), chunk, preprocess, rgb_bands, fast_gray, image_key,
               fields_, cloud)
    nw = min(workers, len(todo))
    loader = DataLoader(_ShardStream(job), batch_size=None, num_workers=nw, collate_fn=_identity,
                        prefetch_factor=4 if nw else None)
    pending: dict[int, _Pending] = {}
    bar = tqdm(total=None, unit="img", desc=f"index 0/{len(todo)} shards", disable=not progress)
    for chunk in loader:
        no = chunk["shard"]
        p = pending.setdefault(no, _Pending())
        p.rows.extend(chunk["rows"])
        if chunk["images"] is not None and centroids is not None and encoder is not None:
            emb = encoder.encode(chunk["images"])
            z, s = assign(emb, centroids.centroids, device=encoder.device)
            p.cluster.append(z)
            p.similarity.append(s)
        bar.update(len(chunk["rows"]))
        if not chunk["done"]:
            continue
        shard, out = todo[no]
        del pending[no]
        if chunk["error"]:
            report.failed[shard] = chunk["error"]
        else:
            report.invalid += _finish(shard, out, p, encoder_id=encoder_id, centroids=centroids,
                                      entropy_mode=mode, optional=optional,
                                      image_key=image_key or "", missing=report.meta_missing)
            report.indexed.append(shard)
            report.samples += len(p.rows)
        bar.set_description(f"index {len(report.indexed) + len(report.failed)}/{len(todo)} shards")
    bar.close()
    return report
