"""Map-style datasets whose item ``i`` is global position ``i`` of an index, for :class:`PrunedSampler`.

* :class:`PrunedShardDataset`: random access into WebDataset tar shards (local files or fsspec
  URLs) through the byte ranges stored in the index. A batch (``__getitems__``, which the
  DataLoader calls with all indices of a batch) is read with coalesced ranges per shard
  (:mod:`rsprune_data.reading`), one ``pread`` or range request per run of nearby samples; each
  item's bytes are checked against the index's per-sample checksum (``verify=False`` skips it) and
  its key against the index's key.
* :class:`PrunedImageFolder`: the image files of a folder in the order ``rsprune-data pack`` writes
  them, so position ``i`` of an index built from the packed shards is file ``i`` of the folder.

Both return the same webdataset-style dict ``{"__key__", "__url__", "<ext>": bytes, ...}`` (member
extensions lower-cased), so one ``decode``/``transform`` serves both::

    index = PruneIndex.load(shards)
    ds = PrunedShardDataset(index, decode="rgb", transform=my_transform)
    loader = DataLoader(ds, sampler=PrunedSampler(index, 0.85), batch_size=64, num_workers=8)

``decode="rgb"`` replaces the first image member (``jpg``, ``png``, ``tif``, ...) by its ``HxWx3``
uint8 array (:func:`rsprune_data.images.decode_rgb`); a callable ``decode(sample)`` may return
anything. ``transform`` is applied last, to whatever ``decode`` returned.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch.utils.data
from numpy.typing import NDArray

from ._validate import is_int
from .errors import ConfigError, CorruptImageError, StaleIndexError
from .reading import (
    LocalFile,
    Piece,
    ReadOptions,
    RemoteFile,
    local_path,
    read_options,
    read_pieces,
    shard_kind,
)
from .reading.samples import cut_block

if TYPE_CHECKING:
    from .index import KeyList, PruneIndex
    from .layout import MemberLayout

__all__ = ["Decode", "PrunedImageFolder", "PrunedShardDataset"]

#: ``None`` (raw bytes), ``"rgb"`` (image member -> HxWx3 uint8), or ``sample -> anything``.
Decode = str | Callable[[dict[str, Any]], Any] | None
_DECODERS = ("rgb",)


def _check_decode(decode: Decode) -> Decode:
    if decode is None or callable(decode) or decode in _DECODERS:
        return decode
    raise ConfigError(
        f"`decode` must be None, one of {list(_DECODERS)} or a callable, got {decode!r}"
    )


def _finish(sample: dict[str, Any], decode: Decode, transform: Callable[[Any], Any] | None) -> Any:
    out: Any = sample
    if decode == "rgb":
        from .images import IMAGE_EXTS, MEMBER_EXTS, decode_rgb, sniff_image_member

        picked = sniff_image_member(sample)
        if picked is None:
            raise CorruptImageError(
                f"sample {sample['__key__']!r} of {sample['__url__']} has no image member "
                f"(members {sorted(k for k in sample if not k.startswith('_'))}, image "
                f"extensions {list(IMAGE_EXTS)}): use decode=None or a callable",
                reason="no_image",
            )
        name, data = picked
        ext = name if name.rsplit(".", 1)[-1].lower() in MEMBER_EXTS else None
        sample[name] = decode_rgb(data, ext)
    elif callable(decode):
        out = decode(sample)
    return out if transform is None else transform(out)


def _check_position(i: Any, n: int) -> int:
    if not is_int(i):
        raise TypeError(f"dataset positions are integers, got {type(i).__name__} {i!r}")
    j = int(i)
    if not -n <= j < n:
        raise IndexError(f"position {j} out of range for a dataset of {n} samples")
    return j % n


def _positions(indices: Sequence[Any], n: int) -> NDArray[np.int64]:
    """``indices`` as checked positions in ``[0, n)`` (negative ones counted from the end)."""
    arr = np.asarray(indices)
    if arr.ndim == 1 and arr.dtype.kind in "iu" and arr.dtype != np.bool_:
        pos = arr.astype(np.int64, copy=False)
        if pos.size and (pos.min() < -n or pos.max() >= n):
            bad = pos[(pos < -n) | (pos >= n)][0]
            raise IndexError(f"position {int(bad)} out of range for a dataset of {n} samples")
        return np.where(pos < 0, pos + n, pos)
    return np.fromiter((_check_position(i, n) for i in indices), dtype=np.int64, count=len(indices))


class PrunedShardDataset(torch.utils.data.Dataset[Any]):
    """Random access to the samples of tar shards, item ``i`` = global position ``i``.

    An item is read with one ``pread`` (local) or range request (URL) of its byte range; a batch
    of items (``__getitems__``) with one read per run of nearby samples of a shard, and the
    samples are cut out of the run buffers (:mod:`rsprune_data.reading`). A worker opens each shard
    once, lazily, and reopens it after a fork. When the index was loaded from files, pickling (for
    ``spawn``/``forkserver`` workers) sends only the shard and index paths; each worker re-reads
    the byte ranges.

    Args:
        source: a :class:`rsprune_data.PruneIndex`, or shard paths (or a brace pattern) to load one.
        index_dir: where the index files are, when ``source`` lists shards (default: beside them).
        decode: ``None``, ``"rgb"`` or a callable (see the module docstring).
        transform: applied to the (decoded) sample.
        check_stale: when loading from shard paths, refuse indexes older than their shard.
        verify: check every item's bytes against the per-sample checksum of its index
            (:mod:`rsprune_data.integrity`; shards indexed without checksums are checked by key
            only). ``False`` saves one hash per item. Keys are always checked.
        storage_options: fsspec options for URL shards.
        read: reading knobs (:class:`~rsprune_data.reading.ReadOptions`); ``storage_options``
            overrides its own.

    Raises:
        ConfigError: a ``pipe:`` shard (streams have no random access), or a bad ``decode``.

    Example:
        >>> ds = PrunedShardDataset(["shard-000000.tar"])  # doctest: +SKIP
        >>> ds[0]["__key__"], sorted(ds[0])  # doctest: +SKIP
        ('airplane/airplane00', ['__key__', '__url__', 'cls.txt', 'tif'])
    """

    def __init__(
        self,
        source: PruneIndex | Sequence[str | os.PathLike[str]] | str,
        *,
        index_dir: str | os.PathLike[str] | None = None,
        decode: Decode = None,
        transform: Callable[[Any], Any] | None = None,
        check_stale: bool = True,
        verify: bool = True,
        storage_options: dict[str, Any] | None = None,
        read: ReadOptions | None = None,
    ) -> None:
        from dataclasses import replace

        from .index import PruneIndex

        index = (
            source
            if isinstance(source, PruneIndex)
            else PruneIndex.load(source, index_dir, check_stale=check_stale)
        )
        streams = [s for s in index.shards if shard_kind(s) == "stream"]
        if streams:
            raise ConfigError(
                f"PrunedShardDataset needs random access, got the stream {streams[0]!r}: pass the "
                "shard's URL (any fsspec protocol) or path, or stream it with PrunedWebDataset"
            )
        self.decode = _check_decode(decode)
        self.transform = transform
        self.read = read_options(read)
        if storage_options is not None:
            self.read = replace(self.read, storage_options=storage_options)
        self.shards = [local_path(s) if shard_kind(s) == "local" else s for s in index.shards]
        self.fingerprint: str = index.fingerprint
        self._starts = np.asarray(index.shard_starts, dtype=np.int64)
        self._index_paths = [Path(p) for p in index.index_paths]
        self._offsets: NDArray[np.int64] | None = np.asarray(index.offsets, dtype=np.int64)
        self._lengths: NDArray[np.int64] | None = np.asarray(index.lengths, dtype=np.int64)
        self.verify = bool(verify)
        self._checksummed = np.asarray(index.checksummed, dtype=bool)
        # keys and checksums of file-backed indexes load on first use (also in each worker)
        self._checksums: NDArray[np.uint64] | None = (
            None if index.index_paths else np.asarray(index.checksums, np.uint64)
        )
        self._keys: KeyList | None = None
        #: per shard, the member layout of file-backed indexes (loaded with the checksums)
        self._layouts: dict[int, MemberLayout | None] = {}
        if not index.index_paths and len(index.keys) == len(index):
            self._keys = index.keys
        self._n = int(self._starts[-1])
        self._files: dict[int, LocalFile | RemoteFile] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int | np.integer[Any]) -> Any:
        """One item: one read of its byte range, cut and checked as in :meth:`__getitems__`
        (without its batch planning, which costs more than the read for a single item)."""
        j = _check_position(i, self._n)
        offsets, lengths = self._ranges()
        if self._checksums is None:
            self._reload_integrity()
        s = int(np.searchsorted(self._starts, j, side="right")) - 1
        o, n = int(offsets[j]), int(lengths[j])
        want = None if self._keys is None else self._keys[j]
        expect = int(self._checksums[j]) if self._verifies(s) else None  # type: ignore[index]
        shard, f = self.shards[s], self._file(s)
        buf = f.read(o, o + n) if isinstance(f, LocalFile) else f.fetch([o], [o + n])[0]
        # one sample: its header walk costs less than taking its layout out of the arrays
        ((sample,),) = cut_block(buf, [0], [Piece(shard, [o], [n], [want], [expect])])
        if self.decode is None and self.transform is None:
            return sample
        return _finish(sample, self.decode, self.transform)

    def __getitems__(self, indices: Sequence[int | np.integer[Any]]) -> list[Any]:
        """The items at ``indices`` (in that order), read with coalesced ranges per shard.

        ``DataLoader`` calls this with every index of a batch when the dataset defines it.
        """
        pos = _positions(indices, self._n)
        order = np.argsort(pos, kind="stable")
        sorted_pos = pos[order]
        offsets, lengths = self._ranges()
        if self._checksums is None:
            self._reload_integrity()
        keys = self._keys
        sums = self._checksums
        # shard s holds sorted_pos[cut[s]:cut[s + 1]]; tar order = position order within a shard
        cut = np.searchsorted(sorted_pos, self._starts)
        out: list[Any] = [None] * len(pos)
        plain = self.decode is None and self.transform is None
        pieces = []
        for s in np.flatnonzero(np.diff(cut)).tolist():
            a, b = int(cut[s]), int(cut[s + 1])
            part = sorted_pos[a:b]
            want: list[str | None] = (
                [None] * (b - a) if keys is None else list(keys.take(part))  # one decode pass
            )
            expect: list[int | None] | None = None
            if self._verifies(s) and sums is not None:
                expect = sums[part].tolist()  # uint64 -> Python int
            numbers = part - self._starts[s]
            layout = self._layouts.get(s) if expect is not None else None
            piece = Piece(
                self.shards[s],
                offsets[part].tolist(),
                lengths[part].tolist(),
                want,
                expect,
                numbers.tolist(),
                None if layout is None else layout.take(numbers),
            )
            pieces.append((s, a, b, piece))
        # one read for the batch: remote pieces share a window of round trips, local runs land in
        # one buffer, and all samples are cut together (reading.read_pieces)
        opened: dict[int, LocalFile] = {}
        for k, p in enumerate(pieces):
            f = self._file(p[0]) if shard_kind(p[3].shard) == "local" else None
            if isinstance(f, LocalFile):
                opened[k] = f
        got_all = read_pieces([p[3] for p in pieces], self.read, opened=opened)
        for (_, a, b, _), got in zip(pieces, got_all, strict=True):
            for slot, sample in zip(order[a:b].tolist(), got, strict=True):
                out[slot] = sample if plain else _finish(sample, self.decode, self.transform)
        return out

    def _verifies(self, shard_no: int) -> bool:
        """Whether the samples of shard ``shard_no`` are checked against their checksums."""
        sums = self._checksums
        return (
            self.verify
            and bool(self._checksummed[shard_no])
            and sums is not None
            and len(sums) == self._n
        )

    # -- byte ranges, re-read from the index files in a worker that got a light pickle
    def _ranges(self) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        if self._offsets is None or self._lengths is None:
            self._offsets, self._lengths = self._reload_ranges()
        return self._offsets, self._lengths

    def _reload_integrity(self) -> None:
        """Keys and checksums from the index files (a file-backed index, once per process)."""
        from .index import KeyList, read_index
        from .layout import layout_of

        sums, kb, ko, base = [], [np.zeros(0, np.uint8)], [np.zeros(1, np.int64)], 0
        self._layouts = {}
        for s, path in enumerate(self._index_paths):
            arrays, meta = read_index(path)
            self._layouts[s] = layout_of(arrays, meta, path, checked=True)  # by read_index
            n = int(self._starts[s + 1] - self._starts[s])
            if len(arrays["key_offsets"]) != n + 1:
                raise StaleIndexError(
                    f"index {path} changed after the dataset was built: build the dataset again"
                )
            sums.append(arrays.get("checksum", np.zeros(n, np.uint64)))
            kb.append(arrays["key_bytes"])
            ko.append(arrays["key_offsets"][1:] + base)
            base += len(arrays["key_bytes"])
        self._checksums = np.concatenate(sums).astype(np.uint64) if sums else np.zeros(0, np.uint64)
        self._keys = KeyList(np.concatenate(kb), np.concatenate(ko))

    def _reload_ranges(self) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        from .index import read_columns

        offs: list[NDArray[np.int64]] = []
        lens: list[NDArray[np.int64]] = []
        for s, path in enumerate(self._index_paths):
            cols, _ = read_columns(path, ("offset", "length"))  # validated: ranges in the shard
            o, n = cols["offset"], cols["length"]
            if len(o) != self._starts[s + 1] - self._starts[s]:
                raise StaleIndexError(
                    f"index {path} changed after the dataset was built ({len(o)} samples, expected "
                    f"{self._starts[s + 1] - self._starts[s]}): build the dataset again"
                )
            offs.append(np.asarray(o, np.int64))
            lens.append(np.asarray(n, np.int64))
        return np.concatenate(offs), np.concatenate(lens)

    # -- open shards: one per shard per process
    def _file(self, shard_no: int) -> LocalFile | RemoteFile:
        if self._pid != os.getpid():  # forked: the inherited descriptors belong to the parent
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(shard_no)
        if f is None:
            shard = self.shards[shard_no]
            f = (
                LocalFile(shard, readahead=self.read.readahead, prefetch=self.read.prefetch)
                if shard_kind(shard) == "local"
                else self.read.remote_file(shard)
            )
            self._files[shard_no] = f
        return f

    def close(self) -> None:
        """Close the shard files this process opened (they reopen on the next access)."""
        if self._pid == os.getpid():
            for f in self._files.values():
                if isinstance(f, LocalFile):
                    f.close()
        self._files = {}

    def __del__(self) -> None:
        try:  # noqa: SIM105 (at interpreter exit the contextlib module may be gone already)
            self.close()
        except (OSError, AttributeError, TypeError):
            pass

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_files"] = {}
        if self._index_paths:  # loaded from files: the worker re-reads the ranges itself
            state["_offsets"] = state["_lengths"] = state["_checksums"] = state["_keys"] = None
            state["_layouts"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()

    def __repr__(self) -> str:
        return f"PrunedShardDataset({self._n} samples in {len(self.shards)} shards)"


class PrunedImageFolder(torch.utils.data.Dataset[Any]):
    """The image files under ``root`` in ``rsprune-data pack`` order, item ``i`` = file ``i``.

    Order, keys and ``cls.txt`` are exactly those of :func:`rsprune_data.pack.pack_folder`: image
    files (``jpg/jpeg/png/tif/tiff``, any case) sorted by relative POSIX path as a string, hidden
    files/folders and empty files left out. A file that pack could not read would shift the
    positions of the files after it; re-pack and re-index after fixing such files.

    Args:
        root: the folder that was packed.
        decode: ``None``, ``"rgb"`` or a callable (see the module docstring).
        transform: applied to the (decoded) sample.

    Example:
        >>> ds = PrunedImageFolder("examples/data/ucmerced")  # doctest: +SKIP
        >>> ds[0]["__key__"]  # doctest: +SKIP
        'agricultural/agricultural00'
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        decode: Decode = None,
        transform: Callable[[Any], Any] | None = None,
    ) -> None:
        from .pack import find_images, pack_sample

        self.root = Path(root)
        if not self.root.is_dir():
            raise ConfigError(f"root={str(self.root)!r} is not an existing folder of images")
        self.decode = _check_decode(decode)
        self.transform = transform
        found, _hidden = find_images(self.root)
        self.files: list[str] = [rel for rel in found if _nonempty(self.root / rel)]
        keys: set[str] = set()
        self.keys: list[str] = [str(pack_sample(rel, b"", keys)["__key__"]) for rel in self.files]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int | np.integer[Any]) -> Any:
        j = _check_position(i, len(self.files))
        rel = self.files[j]
        path = self.root / rel
        parent, _, name = rel.rpartition("/")
        sample: dict[str, Any] = {
            "__key__": self.keys[j],
            "__url__": str(path),
            name.rpartition(".")[2].lower(): path.read_bytes(),
        }
        if parent:
            sample["cls.txt"] = parent.split("/", 1)[0].encode("utf-8")
        return _finish(sample, self.decode, self.transform)

    def __repr__(self) -> str:
        return f"PrunedImageFolder({len(self.files)} images under {self.root})"


def _nonempty(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except OSError:
        return False
