"""Whole-stream reading for shards that cannot seek (``pipe:`` commands, anything ``gopen`` opens).

Shape: ``(url, wanted sample numbers in tar order)`` -> ``(key, {ext: bytes})`` of those samples.
The tar is read in one pass; unwanted samples are dropped by their number without being decoded,
and the stream is closed as soon as the last wanted sample has been read.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from ..errors import StaleIndexError
from ..tario import iter_tar_samples_raw
from .samples import Sample, check_sample

__all__ = ["stream_samples"]

_SIGPIPE_STATUS = (-13, 141)  # a child killed by SIGPIPE, as Popen and as a shell report it


def stream_samples(
    url: str,
    wanted: Sequence[int],
    keys: Sequence[str | None],
    offsets: Sequence[int],
    sums: Sequence[int | None] | None = None,
) -> Iterator[Sample]:
    """The samples numbered ``wanted`` (ascending, within the shard) of the stream ``url``.

    Args:
        url: anything :func:`webdataset.gopen.gopen` opens (``pipe:cmd``, a path, a URL).
        wanted: sample numbers in tar order, ascending.
        keys: the index's key of each wanted sample (``None`` where unknown).
        offsets: the index's byte offset of each, for messages.
        sums: the index's checksum of each (``None``: not verified).

    Raises:
        StaleIndexError: the stream ends before the last wanted sample, or a key differs.
    """
    from webdataset.gopen import gopen

    if not wanted:
        return
    stream = gopen(url)
    j = 0
    try:
        for i, (ts, members, raw) in enumerate(iter_tar_samples_raw(stream, name=url)):
            if i != wanted[j]:
                continue  # dropped by position: never decoded
            key = ts.key
            check_sample(
                url,
                offsets[j],
                key,
                keys[j],
                members,
                raw,
                0,
                len(raw),
                None if sums is None else sums[j],
            )
            yield key, members
            j += 1
            if j == len(wanted):
                break
    finally:
        _close(stream, early=j == len(wanted))
    if j < len(wanted):
        raise StaleIndexError(
            f"stream {url} ended after fewer samples than its index lists: "
            "the shard changed since indexing; run `rsprune-data index` again"
        )


def _close(stream: Any, *, early: bool) -> None:
    """Close a gopen stream; a ``pipe:`` child killed by SIGPIPE because we stopped early is fine."""
    try:
        stream.close()
    except OSError:
        if not (early and getattr(stream, "status", None) in _SIGPIPE_STATUS):
            raise
