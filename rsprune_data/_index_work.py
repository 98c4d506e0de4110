"""The indexer's per-shard work, run in a supervised worker process (or in the main one).

One shard -> chunks (plain dicts, picklable: no exception objects, no tensors)::

    shard_metadata(shard)                      taken *before* reading (size, mtime, fingerprint)
    iter_tar_samples_raw -> (TarSample, {ext: bytes}, raw range bytes)
      -> SampleRow(key, offset, length, entropy, nodata, reason, checksum of raw)
         + encoder.preprocess(rgb) -> float32 [3, S, S] for valid samples (with an encoder)
    chunks of <= batch_size rows: {"shard", "rows", "images": float32 [m, 3, S, S] | None,
                                   "examples": {reason: "key: message"}, "done", "error", "meta"}
    the last chunk (done=True) carries the metadata taken before reading, after checking that the
    shard still has it (a shard replaced or rewritten while being read is an error, not an index).

Every failure stays where it happened: an image that cannot be decoded is a row with a reason; a
shard that cannot be read (damaged tar, forged header sizes, I/O error, MemoryError, anything
else) ends with one ``done`` chunk whose ``error`` names the cause. Exceptions never cross the
process boundary (a codec's exception class may not unpickle in the parent).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from . import index as idx
from .errors import CorruptImageError, ShardError
from .images import DEFAULT_DECODE_BUDGET, analyze, pick_image_member
from .integrity import checksum
from .reading import local_path, remote_metadata, shard_kind
from .tario import iter_tar_samples_raw

NO_IMAGE = "no_image"
META_PREFIX = "meta."
UNEXPECTED = "unexpected_error"  # reason of a sample whose analysis raised something unforeseen


class SampleRow(NamedTuple):
    """What the indexer records for one sample (extend with defaulted fields)."""

    key: str
    offset: int
    length: int
    entropy: float
    nodata: float
    reason: str  # "" = valid
    checksum: int  # integrity.checksum of the sample's byte range
    extras: tuple[float, ...] = ()  # optional columns: (cloud score if asked, *meta values)
    members: dict[str, tuple[int, int]] | None = None  # TarSample.members (the member layout)


@dataclass(frozen=True)
class Job:
    """The picklable part of the work, shipped to worker processes."""

    shards: tuple[str, ...]
    batch_size: int
    preprocess: Any  # encoder.preprocess (an ImageTransform) or None for entropy only
    rgb_bands: tuple[int, int, int]
    fast_gray: bool = False
    decode_budget: int | None = DEFAULT_DECODE_BUDGET
    image_key: str | None = None
    meta_fields: tuple[str, ...] = ()
    cloud: bool = False
    storage_options: dict[str, Any] | None = None  # fsspec options for URL shards


def describe(exc: BaseException) -> str:
    """A one-line, picklable account of an exception (our own messages already name the shard)."""
    if isinstance(exc, ShardError):
        return str(exc)
    text = str(exc) or repr(exc)
    if isinstance(exc, MemoryError):
        text = f"out of memory ({text}): a forged or huge size in the shard?"
    return f"{type(exc).__name__}: {text}"


def _analyze_one(job: Job, sample: dict[str, bytes]) -> tuple[float, float, float, Any]:
    picked = pick_image_member(sample, job.image_key)
    if picked is None:
        what = f"no {job.image_key!r} member" if job.image_key else "no image member"
        raise CorruptImageError(f"sample has {what}", reason=NO_IMAGE)
    name, data = picked
    st = analyze(
        data,
        name if job.image_key is None else None,
        want_rgb=job.preprocess is not None,
        want_cloud=job.cloud,
        rgb_bands=job.rgb_bands,
        fast_gray=job.fast_gray,
        max_decoded_bytes=job.decode_budget,
    )
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


def _changed(shard: str, before: dict[str, str], ino: int) -> str | None:
    """Why ``shard`` no longer is the file whose metadata was taken before reading it."""
    try:
        st = os.stat(shard)
    except OSError as exc:
        return f"shard {shard} disappeared while being indexed ({exc.strerror or exc})"
    if (
        st.st_ino != ino
        or str(st.st_size) != before["shard_size"]
        or str(st.st_mtime_ns) != before["shard_mtime_ns"]
        or idx.shard_fingerprint(shard) != before["shard_fingerprint"]
    ):
        return (
            f"shard {shard} was replaced or changed while being indexed: run "
            "`rsprune-data index` again once it is stable"
        )
    return None


def _changed_remote(
    shard: str, before: dict[str, str], options: dict[str, Any] | None
) -> str | None:
    """Why the remote ``shard`` no longer has the size and store checksum taken before reading."""
    now = remote_metadata(shard, options)
    if any(now[k] != before[k] for k in ("shard_size", "shard_fingerprint")):
        return (
            f"remote shard {shard} was replaced or changed while being indexed (size or "
            "checksum): run `rsprune-data index` again once it is stable"
        )
    return None


def _open_remote(job: Job, shard: str) -> Any:
    """A URL shard opened for one sequential pass through fsspec (large blocks)."""
    from .reading.remote import open_url

    fs, path = open_url(shard, job.storage_options)
    return fs.open(path, "rb", block_size=8 << 20)


def shard_chunks(job: Job, shard_no: int) -> Iterator[dict[str, Any]]:
    """Chunks of one shard (module docstring); the last has ``done=True``. Never raises."""
    shard = job.shards[shard_no]
    rows: list[SampleRow] = []
    images: list[Any] = []
    examples: dict[str, str] = {}

    def flush(
        done: bool, error: str | None = None, meta: dict[str, str] | None = None
    ) -> dict[str, Any]:
        nonlocal rows, images, examples
        chunk = {
            "shard": shard_no,
            "rows": rows,
            "done": done,
            "error": error,
            "meta": meta,
            "examples": examples,
            "images": np.stack([np.asarray(im, np.float32) for im in images]) if images else None,
        }
        rows, images, examples = [], [], {}
        return chunk

    try:
        remote = shard_kind(shard) == "remote"
        path = shard if remote else local_path(shard)
        # before reading: a later change must not be trusted
        before = remote_metadata(shard, job.storage_options) if remote else idx.shard_metadata(path)
        ino = 0 if remote else os.stat(path).st_ino
        with contextlib.ExitStack() as stack:
            source = stack.enter_context(_open_remote(job, shard)) if remote else path
            for ts, sample, raw in iter_tar_samples_raw(source, name=shard):
                reason = ""
                try:
                    ent, nod, cloud, image = _analyze_one(job, sample)
                    if image is not None:
                        images.append(image)
                except CorruptImageError as exc:
                    ent, nod, cloud, reason = 0.0, 0.0, math.nan, exc.reason
                    examples.setdefault(reason, f"{ts.key}: {exc}")
                except (
                    Exception
                ) as exc:  # a transform's or a codec's surprise: one sample, not the shard
                    ent, nod, cloud, reason = 0.0, 0.0, math.nan, UNEXPECTED
                    examples.setdefault(reason, f"{ts.key}: {describe(exc)}")
                extras = ((cloud,) if job.cloud else ()) + meta_values(sample, job.meta_fields)
                rows.append(
                    SampleRow(
                        ts.key,
                        ts.offset,
                        ts.length,
                        ent,
                        nod,
                        reason,
                        checksum(raw),
                        extras,
                        ts.members,
                    )
                )
                if len(rows) >= job.batch_size:
                    yield flush(False)
        changed = (
            _changed_remote(shard, before, job.storage_options)
            if remote
            else _changed(path, before, ino)
        )
    except Exception as exc:  # MemoryError, OSError, ShardError, ...: this shard only
        yield flush(True, describe(exc))
        return
    yield flush(True, changed, None if changed else before)
