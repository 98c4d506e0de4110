"""Map-style datasets whose item ``i`` is global position ``i`` of an index, for :class:`PrunedSampler`.

* :class:`PrunedShardDataset`: random access into local WebDataset tar shards through the byte
  ranges stored in the index (one ``os.pread`` per item, no tar walk); each item's bytes are
  checked against the index's per-sample checksum (``verify=False`` skips it) and its key against
  the index's key.
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

import contextlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch.utils.data
from numpy.typing import NDArray

from .errors import ConfigError, CorruptImageError, ShardError, StaleIndexError
from .integrity import check_key, check_sample
from .tario import parse_sample

if TYPE_CHECKING:
    from .index import KeyList, PruneIndex

__all__ = ["Decode", "PrunedImageFolder", "PrunedShardDataset"]

#: ``None`` (raw bytes), ``"rgb"`` (image member -> HxWx3 uint8), or ``sample -> anything``.
Decode = str | Callable[[dict[str, Any]], Any] | None
_DECODERS = ("rgb",)


def _check_decode(decode: Decode) -> Decode:
    if decode is None or callable(decode) or decode in _DECODERS:
        return decode
    raise ConfigError(f"`decode` must be None, one of {list(_DECODERS)} or a callable, got {decode!r}")


def _finish(sample: dict[str, Any], decode: Decode, transform: Callable[[Any], Any] | None) -> Any:
    out: Any = sample
    if decode == "rgb":
        from .images import IMAGE_EXTS, decode_rgb, pick_image_member

        picked = pick_image_member(sample)
        if picked is None:
            raise CorruptImageError(
                f"sample {sample['__key__']!r} of {sample['__url__']} has no image member "
                f"(members {sorted(k for k in sample if not k.startswith('_'))}, image "
                f"extensions {list(IMAGE_EXTS)}): use decode=None or a callable",
                reason="no_image",
            )
        name, data = picked
        sample[name] = decode_rgb(data, name)
    elif callable(decode):
        out = decode(sample)
    return out if transform is None else transform(out)


def _check_position(i: Any, n: int) -> int:
    if isinstance(i, bool) or not isinstance(i, int | np.integer):
        raise TypeError(f"dataset positions are integers, got {type(i).__name__} {i!r}")
    j = int(i)
    if not -n <= j < n:
        raise IndexError(f"position {j} out of range for a dataset of {n} samples")
    return j % n


class PrunedShardDataset(torch.utils.data.Dataset[Any]):
    """Random access to the samples of local tar shards, item ``i`` = global position ``i``.

    Each item is read with one ``os.pread`` of its byte range and parsed with
    :func:`rsprune_data.tario.parse_sample`. A worker opens each shard once, lazily, and reopens it
    after a fork. When the index was loaded from files, pickling (for ``spawn``/``forkserver``
    workers) sends only the shard and index paths; each worker re-reads the byte ranges.

    Args:
        source: a :class:`rsprune_data.PruneIndex`, or shard paths (or a brace pattern) to load one.
        index_dir: where the index files are, when ``source`` lists shards (default: beside them).
        decode: ``None``, ``"rgb"`` or a callable (see the module docstring).
        transform: applied to the (decoded) sample.
        check_stale: when loading from shard paths, refuse indexes older than their shard.
        verify: check every item's bytes against the per-sample checksum of its index
            (:mod:`rsprune_data.integrity`; shards indexed without checksums are checked by key
            only). ``False`` saves one hash per item. Keys are always checked.

    Raises:
        ConfigError: a remote shard (only local files support random access), or a bad ``decode``.

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
    ) -> None:
        from .index import PruneIndex, is_remote

        index = source if isinstance(source, PruneIndex) else PruneIndex.load(
            source, index_dir, check_stale=check_stale)
        remote = [s for s in index.shards if is_remote(s)]
        if remote:
            raise ConfigError(
                f"PrunedShardDataset needs local shard files for random access, got {remote[0]!r}: "
                "copy the shards to a local or mounted disk, or stream them with PrunedWebDataset"
            )
        self.decode = _check_decode(decode)
        self.transform = transform
        self.shards = [s[len("file://"):] if s.startswith("file://") else s for s in index.shards]
        self.fingerprint: str = index.fingerprint
        self._starts = np.asarray(index.shard_starts, dtype=np.int64)
        self._index_paths = [Path(p) for p in index.index_paths]
        self._offsets: NDArray[np.int64] | None = np.asarray(index.offsets, dtype=np.int64)
        self._lengths: NDArray[np.int64] | None = np.asarray(index.lengths, dtype=np.int64)
        self.verify = bool(verify)
        self._checksummed = np.asarray(index.checksummed, dtype=bool)
        # keys and checksums of file-backed indexes load on first use (also in each worker)
        self._checksums: NDArray[np.uint64] | None = (
            None if index.index_paths else np.asarray(index.checksums, np.uint64))
        self._keys: KeyList | None = None
        if not index.index_paths and len(index.keys) == len(index):
            self._keys = index.keys
        self._n = int(self._starts[-1])
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int | np.integer[Any]) -> Any:
        j = _check_position(i, self._n)
        shard_no = int(np.searchsorted(self._starts, j, side="right")) - 1
        offsets, lengths = self._ranges()
        offset, length = int(offsets[j]), int(lengths[j])
        buf = self._pread(shard_no, offset, length)
        shard = self.shards[shard_no]
        if self._checksums is None:
            self._reload_integrity()
        keys = self._keys
        if self.verify and self._checksummed[shard_no] and self._checksums is not None:
            check_sample(buf, int(self._checksums[j]), shard=shard, offset=offset,
                         key=lambda: keys[j] if keys is not None else f"#{j}")
        key, members = parse_sample(buf, offset, shard=shard)
        if keys is not None:
            check_key(key, keys[j], shard=shard, offset=offset)
        sample: dict[str, Any] = {"__key__": key, "__url__": self.shards[shard_no], **members}
        return _finish(sample, self.decode, self.transform)

    # -- byte ranges, re-read from the index files in a worker that got a light pickle
    def _ranges(self) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        if self._offsets is None or self._lengths is None:
            self._offsets, self._lengths = self._reload_ranges()
        return self._offsets, self._lengths

    def _reload_integrity(self) -> None:
        """Keys and checksums from the index files (a file-backed index, once per process)."""
        from .index import KeyList, read_index

        sums, kb, ko, base = [], [np.zeros(0, np.uint8)], [np.zeros(1, np.int64)], 0
        for s, path in enumerate(self._index_paths):
            arrays, _ = read_index(path)
            n = int(self._starts[s + 1] - self._starts[s])
            if len(arrays["key_offsets"]) != n + 1:
                raise StaleIndexError(f"index {path} changed after the dataset was built: build "
                                      "the dataset again")
            sums.append(arrays.get("checksum", np.zeros(n, np.uint64)))
            kb.append(arrays["key_bytes"])
            ko.append(arrays["key_offsets"][1:] + base)
            base += len(arrays["key_bytes"])
        self._checksums = np.concatenate(sums).astype(np.uint64) if sums else np.zeros(0, np.uint64)
        self._keys = KeyList(np.concatenate(kb), np.concatenate(ko))

    def _reload_ranges(self) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        from safetensors import safe_open

        offs: list[NDArray[np.int64]] = []
        lens: list[NDArray[np.int64]] = []
        for s, path in enumerate(self._index_paths):
            with safe_open(path, framework="np") as f:
                o, n = f.get_tensor("offset"), f.get_tensor("length")
            if len(o) != self._starts[s + 1] - self._starts[s]:
                raise StaleIndexError(
                    f"index {path} changed after the dataset was built ({len(o)} samples, expected "
                    f"{self._starts[s + 1] - self._starts[s]}): build the dataset again"
                )
            offs.append(np.asarray(o, np.int64))
            lens.append(np.asarray(n, np.int64))
        return np.concatenate(offs), np.concatenate(lens)

    # -- file handles: one per shard per process
    def _fd(self, shard_no: int) -> int:
        if self._pid != os.getpid():  # forked: the inherited descriptors belong to the parent
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(shard_no)
        if fd is None:
            path = self.shards[shard_no]
            try:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            except OSError as exc:
                raise ShardError(
                    f"cannot open shard {path}: {exc.strerror or exc}; it must be where it was when "
                    "the index was loaded"
                ) from exc
            self._fds[shard_no] = fd
        return fd

    def _pread(self, shard_no: int, offset: int, length: int) -> bytes:
        fd = self._fd(shard_no)
        parts: list[bytes] = []
        got, pos = 0, offset
        while got < length:
            chunk = os.pread(fd, length - got, pos)
            if not chunk:
                raise ShardError(
                    f"shard {self.shards[shard_no]} ends at byte {pos}, inside the sample at byte "
                    f"{offset} (+{length}): the shard changed since indexing; run `rsprune-data "
                    "index` again"
                )
            parts.append(chunk)
            got += len(chunk)
            pos += len(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self) -> None:
        """Close the shard files this process opened (they reopen on the next access)."""
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = {}

    def __del__(self) -> None:
        with contextlib.suppress(OSError, AttributeError):
            self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fds"] = {}
        if self._index_paths:  # loaded from files: the worker re-reads the ranges itself
            state["_offsets"] = state["_lengths"] = state["_checksums"] = state["_keys"] = None
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
        sample: dict[str, Any] = {"__key__": self.keys[j], "__url__": str(path),
                                  name.rpartition(".")[2].lower(): path.read_bytes()}
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
