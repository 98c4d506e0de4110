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

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from . import index as idx
from .errors import CorruptImageError, ShardError
from .images import DEFAULT_DECODE_BUDGET, analyze, pick_image_member
from .integrity import checksum
from .tario import iter_tar_samples_raw

NO_IMAGE = "no_image"
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


@dataclass(frozen=True)
class Job:
    """The picklable part of the work, shipped to worker processes."""

    shards: tuple[str, ...]
    batch_size: int
    preprocess: Any  # encoder.preprocess (an ImageTransform) or None for entropy only
    rgb_bands: tuple[int, int, int]
    fast_gray: bool = False
    decode_budget: int | None = DEFAULT_DECODE_BUDGET


def describe(exc: BaseException) -> str:
    """A one-line, picklable account of an exception (our own messages already name the shard)."""
    if isinstance(exc, ShardError):
        return str(exc)
    text = str(exc) or repr(exc)
    if isinstance(exc, MemoryError):
        text = f"out of memory ({text}): a forged or huge size in the shard?"
    return f"{type(exc).__name__}: {text}"


def _analyze_one(job: Job, sample: dict[str, bytes]) -> tuple[float, float, Any]:
    picked = pick_image_member(sample)
    if picked is None:
        raise CorruptImageError("sample has no image member", reason=NO_IMAGE)
    ext, data = picked
    st = analyze(data, ext, want_rgb=job.preprocess is not None, rgb_bands=job.rgb_bands,
                 fast_gray=job.fast_gray, max_decoded_bytes=job.decode_budget)
    image = job.preprocess(st.rgb) if job.preprocess is not None else None
    return st.entropy, st.nodata, image


def _changed(shard: str, before: dict[str, str], ino: int) -> str | None:
    """Why ``shard`` no longer is the file whose metadata was taken before reading it."""
    try:
        st = os.stat(shard)
    except OSError as exc:
        return f"shard {shard} disappeared while being indexed ({exc.strerror or exc})"
    if st.st_ino != ino or str(st.st_size) != before["shard_size"] \
            or str(st.st_mtime_ns) != before["shard_mtime_ns"] \
            or idx.shard_fingerprint(shard) != before["shard_fingerprint"]:
        return (f"shard {shard} was replaced or changed while being indexed: run "
                "`rsprune-data index` again once it is stable")
    return None


def shard_chunks(job: Job, shard_no: int) -> Iterator[dict[str, Any]]:
    """Chunks of one shard (module docstring); the last has ``done=True``. Never raises."""
    shard = job.shards[shard_no]
    rows: list[SampleRow] = []
    images: list[Any] = []
    examples: dict[str, str] = {}

    def flush(done: bool, error: str | None = None,
              meta: dict[str, str] | None = None) -> dict[str, Any]:
        nonlocal rows, images, examples
        chunk = {"shard": shard_no, "rows": rows, "done": done, "error": error, "meta": meta,
                 "examples": examples,
                 "images": np.stack([np.asarray(im, np.float32) for im in images])
                 if images else None}
        rows, images, examples = [], [], {}
        return chunk

    try:
        ino = os.stat(shard).st_ino
        before = idx.shard_metadata(shard)  # before reading: a later change must not be trusted
        for ts, sample, raw in iter_tar_samples_raw(shard):
            reason = ""
            try:
                ent, nod, image = _analyze_one(job, sample)
                if image is not None:
                    images.append(image)
            except CorruptImageError as exc:
                ent, nod, reason = 0.0, 0.0, exc.reason
                examples.setdefault(reason, f"{ts.key}: {exc}")
            except Exception as exc:  # a transform's or a codec's surprise: one sample, not the shard
                ent, nod, reason = 0.0, 0.0, UNEXPECTED
                examples.setdefault(reason, f"{ts.key}: {describe(exc)}")
            rows.append(SampleRow(ts.key, ts.offset, ts.length, ent, nod, reason, checksum(raw)))
            if len(rows) >= job.batch_size:
                yield flush(False)
        changed = _changed(shard, before, ino)
    except Exception as exc:  # MemoryError, OSError, ShardError, ...: this shard only
        yield flush(True, describe(exc))
        return
    yield flush(True, changed, None if changed else before)
