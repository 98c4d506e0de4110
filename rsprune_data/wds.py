"""`PrunedWebDataset`: stream only the RS-Prune selection out of WebDataset tar shards.

A webdataset pipeline whose first stage yields the selected samples as the same dicts
``wds.WebDataset`` yields (``__key__``, ``__url__``, ``__local_path__`` for local shards, one raw
``bytes`` value per member extension), so webdataset's stages chain after it unchanged::

    ds = PrunedWebDataset("shards/shard-{000000..000099}.tar", PruneConfig(prune_ratio=0.85))
    pipeline = ds.decode("pil").to_tuple("jpg;jpeg;png", "cls.txt").batched(64)
    loader = DataLoader(pipeline, batch_size=None, num_workers=8, persistent_workers=True)
    for epoch in range(epochs):
        ds.set_epoch(epoch)                  # before iter(loader); reaches persistent workers
        for images, labels in loader: ...

**Reading.** Local shards (paths, ``file://``) are read by byte range from the index
(:func:`rsprune_data.tario.read_ranges`, neighbours within ``max_gap`` merged into one ``pread``); a
shard without a selected sample in a worker's span is never opened. Streams (``pipe:``, ``http://``
and anything else :func:`webdataset.gopen.gopen` opens) are read in one pass and unselected samples
are dropped by their position in the tar without being decoded; a stream is closed as soon as its
last selected sample has been read. Every delivered ``__key__`` is checked against the index, and
with ``verify=True`` (the default) every sample's bytes against its per-sample checksum
(:func:`rsprune_data.integrity.check_sample`, at the point where the sample is cut out).

**Order and split (one epoch, pure numpy: :func:`epoch_plan`).** Shards are permuted by
``rng([seed, epoch])`` (``shuffle_shards``); the global sequence is the selected samples of the
first shard in tar order, then of the second, ... Like ``DistributedSampler`` it is padded by
wrapping around from its start to ``R * ceil(n / R)`` items, or cut to ``R * floor(n / R)`` with
``drop_last``, so every one of the ``R`` ranks delivers exactly the same number of samples. Rank ``r``
takes the ``r``-th contiguous span of that sequence and its ``W`` DataLoader workers cut the span
into ``W`` contiguous pieces whose lengths differ by at most one (Megatron-Energon's global split
of samples over all workers): a piece may start or end inside a shard, so ``R * W`` may exceed the
number of shards (with webdataset's shard-per-worker split that case leaves workers empty or hangs,
webdataset issue #188). Shuffle samples within a worker with webdataset's ``.shuffle(n)``.

**Epoch and config reach every worker.** DataLoader workers iterate a copy of the dataset made when
they start, and with ``persistent_workers=True`` that copy lives for the whole run. The epoch, the
config and a loaded resume point therefore live in a few bytes of shared memory (:class:`_Control`,
a torch tensor, handed to workers by handle under fork and spawn), read at the start of every pass.
:meth:`~PrunedWebDataset.set_epoch`, :meth:`~PrunedWebDataset.set_config` and
:meth:`~PrunedWebDataset.set_prune_ratio` called in the main process before ``iter(loader)`` apply to
that pass in every worker. A pass in progress never changes: a change made during an epoch applies
from the next pass. Chained copies (``ds.decode(...)``) share the same state, so calling ``set_epoch``
on either is the same. A config may be a schedule ``epoch -> PruneConfig | float`` (a float means
``PruneConfig(prune_ratio=float)``), evaluated at the start of each pass in each worker.

**Resume** counts *selected* samples delivered, never the unfiltered stream (MosaicML streaming
#800). ``state_dict()`` describes the pass of the process it is called in: exact with
``num_workers=0``, and inside every worker with torchdata's ``StatefulDataLoader``, which calls it in
each worker and hands each worker its own state back. With a plain ``DataLoader`` and workers use
``state_dict(delivered=steps, batch_size=b, num_workers=W)``: the position of every worker follows from
the number of items the loader handed out, because the loader takes one item from each worker in
turn (worker order; a worker that is exhausted is skipped). After loading, workers are rotated so the
next item comes from the right worker and the rest of the stream is identical. Exactness holds at
item boundaries with the default partial last batches; a ``.shuffle(n)`` stage loses the samples in
its buffer at the save point. As with :class:`~rsprune_data.PrunedSampler` the training loop owns the
epoch: a state from inside an epoch sets that epoch and passes of it continue from the saved
position (a state loaded in the main process stays in force for that epoch, since the main process
cannot see when its workers used it) until ``set_epoch`` moves to another epoch or ``set_config`` is
called. A state taken at the end of an epoch leaves the epoch alone. ``rank`` is informational:
ranks deliver in lockstep, so one rank's ``delivered`` state resumes them all. Loading refuses (:class:`StateDictError`) a
state from another index, seed, ``shuffle_shards``, ``drop_last`` or world size, or, while samples of
its epoch remain, another config; a worker's state also needs the same ``num_workers``.
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import numpy as np
from numpy.typing import NDArray
from webdataset.compat import FluidInterface
from webdataset.pipeline import DataPipeline

from ._control import _Control
from ._validate import check_int
from .config import PruneConfig, Schedule, as_config
from .errors import ConfigError, StaleIndexError, StateDictError
from .index import PruneIndex, is_remote
from .integrity import check_sample
from .partition import per_rank
from .stream_plan import EpochPlan, epoch_plan, shard_runs, worker_batches
from .tario import iter_tar_samples_raw, parse_sample, read_ranges
from .world import World, distributed_rank, get_world

__all__ = ["DEFAULT_MAX_GAP", "EpochPlan", "PrunedWebDataset", "epoch_plan", "worker_batches"]

#: Default ``max_gap`` of :class:`PrunedWebDataset`: merge samples that touch or are less than a
#: page apart. Bridging wider gaps buys nothing on a local disk and reads far more bytes when tiles
#: are small (``benchmarks/streaming_io.py``, Harvey tiles of ~6.5 KB, 85% pruned, warm cache:
#: 0.150x of the shard bytes and 29.5x the plain stream at 0-4 KiB; 0.589x and 24.9x at tario's
#: 64 KiB). On network filesystems, where a round trip costs more, pass a larger ``max_gap``.
DEFAULT_MAX_GAP = 4096
STATE_FORMAT = "rsprune-wds"
STATE_VERSION = 1
_CACHE_SIZE = 4
_SIGPIPE_STATUS = (-13, 141)  # a child killed by SIGPIPE, as Popen and as a shell report it

Sample = dict[str, Any]


@dataclass
class _Pass:
    """One pass of one process over its span: what ``state_dict()`` reports."""

    epoch: int
    gen: int
    config: PruneConfig
    world: World
    rotation: int  # this worker serves span (worker + rotation) % num_workers
    consumed: int  # samples of the span delivered, including those skipped by a resume
    num_samples: int  # length of the span
    positions: NDArray[np.int64]  # what is left to deliver
    finished: bool = False


def _complete(state: dict[str, Any]) -> bool:
    if "delivered" in state:
        return int(state["delivered"]) >= int(state["items"])
    return bool(state["finished"]) or int(state["consumed"]) >= int(state["num_samples"])


# --- the source stage ----------------------------------------------------------------------------


class _Source:
    """The pipeline's first stage: called with no argument, returns an iterator of sample dicts."""

    def __init__(self, index: PruneIndex, load_args: tuple[Any, ...] | None, config: Any, *,
                 seed: int, shuffle_shards: bool, drop_last: bool, rank: int | None,
                 world_size: int | None, max_gap: int, verify: bool = True) -> None:
        self._index: PruneIndex | None = index
        self.verify = verify
        self._load_args = load_args  # (shards, index_dir, check_stale) to reload after pickling
        self.seed, self.shuffle_shards, self.drop_last = seed, shuffle_shards, drop_last
        self.max_gap = max_gap
        self._explicit = (rank, world_size)
        self.rank, self.world_size = distributed_rank(rank, world_size)
        self._schedule: Schedule | None = None
        self._schedule_id = 0
        self._control = _Control({"gen": 0, "epoch": 0, "config": None, "schedule": None,
                                  "resume": None})
        self.set_config(config)
        self._selections: OrderedDict[PruneConfig, NDArray[np.int64]] = OrderedDict()
        self._plan_key: tuple[Any, ...] | None = None
        self._plan: EpochPlan | None = None
        self._keys: Sequence[str] | None = None
        self._pending: dict[str, Any] | None = None  # a state loaded inside a DataLoader worker
        self._pass: _Pass | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_selections=OrderedDict(), _plan_key=None, _plan=None, _keys=None)
        if self._load_args is not None:
            state["_index"] = None  # workers started by spawn re-open the memory-mapped files
        return state

    # -- index, config, plan
    @property
    def index(self) -> PruneIndex:
        if self._index is None:  # dropped by __getstate__ only when _load_args can reload it
            shards, index_dir, check_stale = self._load_args or ((), None, True)
            self._index = PruneIndex.load(shards, index_dir, check_stale=check_stale)
        return self._index

    def refresh_world(self) -> None:
        """Re-read rank and world size in the main process (a group initialised after __init__)."""
        from torch.utils.data import get_worker_info

        if get_worker_info() is None:
            self.rank, self.world_size = distributed_rank(*self._explicit)

    def world(self) -> World:
        return get_world(self.rank, self.world_size)

    def set_config(self, config: Any) -> None:
        if callable(config) and not isinstance(config, PruneConfig):
            self._schedule = config
            self._schedule_id = self._control.read()["gen"] + 1
            self._control.update(config=None, schedule=self._schedule_id, resume=None)
        else:
            cfg = as_config(config, "config")
            self._control.update(config=cfg.to_dict(), schedule=None, resume=None)

    def config_for(self, epoch: int, ctl: dict[str, Any] | None = None) -> PruneConfig:
        ctl = self._control.read() if ctl is None else ctl
        if ctl["schedule"] is None:
            return PruneConfig.from_dict(ctl["config"])
        if ctl["schedule"] != self._schedule_id or self._schedule is None:
            raise ConfigError(
                "a schedule passed to set_config() after persistent DataLoader workers started "
                "cannot reach them: pass it to PrunedWebDataset(...) or call set_config(schedule) "
                "before the loader's first iteration"
            )
        return as_config(self._schedule(epoch), f"schedule({epoch})")

    def selected(self, config: PruneConfig) -> NDArray[np.int64]:
        hit = self._selections.get(config)
        if hit is None:
            hit = np.asarray(self.index.select(config), dtype=np.int64)
            self._selections[config] = hit
            while len(self._selections) > _CACHE_SIZE:
                self._selections.popitem(last=False)
        self._selections.move_to_end(config)
        return hit

    def plan(self, epoch: int, config: PruneConfig, world_size: int) -> EpochPlan:
        key = (epoch, config, world_size)
        if self._plan is None or self._plan_key != key:
            self._plan = epoch_plan(self.selected(config), self.index.shard_starts,
                                    seed=self.seed, epoch=epoch,
                                    shuffle_shards=self.shuffle_shards, world_size=world_size,
                                    drop_last=self.drop_last)
            self._plan_key = key
        return self._plan

    # -- a pass
    def __call__(self) -> Iterator[Sample]:
        return self._deliver(self._begin())

    def _begin(self) -> _Pass:
        world = self.world()
        ctl = self._control.read()
        epoch = int(ctl["epoch"])
        resume, self._pending = (self._pending or ctl["resume"]), None
        if resume is not None and int(resume["epoch"]) != epoch:
            if not _complete(resume):
                warnings.warn(
                    f"a state loaded for epoch {resume['epoch']} is ignored: this pass is epoch "
                    f"{epoch}. Call set_epoch({resume['epoch']}) to resume it.",
                    RuntimeWarning, stacklevel=3)
            resume = None
        config = self.config_for(epoch, ctl)
        if resume is not None and PruneConfig.from_dict(resume["config"]) != config:
            raise StateDictError(f"the loaded state's config {resume['config']} is not the "
                                 f"config of epoch {epoch}, {config.to_dict()}")
        plan = self.plan(epoch, config, world.world_size)
        rotation, skip = (0, 0) if resume is None else self._resume_point(resume, world)
        start, stop = plan.worker_span(world.rank, (world.worker + rotation) % world.num_workers,
                                       world.num_workers)
        skip = min(skip, stop - start)
        p = _Pass(epoch, int(ctl["gen"]), config, world, rotation, skip, stop - start,
                  plan.positions(start + skip, stop))
        self._pass = p
        return p

    @staticmethod
    def _resume_point(state: dict[str, Any], world: World) -> tuple[int, int]:
        """``(rotation, samples to skip)`` of this worker for a loaded state."""
        w, nw = world.worker, world.num_workers
        if int(state["world_size"]) != world.world_size:
            raise StateDictError(f"the state was saved with world_size={state['world_size']}, "
                                 f"this run has {world.world_size}: resume on as many ranks")
        if "delivered" in state:  # items handed out by the loader, one per worker in turn
            k, b = int(state["delivered"]), int(state["batch_size"])
            if k == 0:
                return 0, 0
            if int(state["num_workers"]) != nw:
                raise StateDictError(f"the state was saved with num_workers={state['num_workers']}"
                                     f", this loader has {nw}: resume with the same num_workers")
            s = k % nw
            v = (w + s) % nw
            return s, (k // nw + (1 if v < s else 0)) * b
        if int(state["num_workers"]) != nw or int(state["worker"]) != w:
            raise StateDictError(
                f"the state is worker {state['worker']}'s of {state['num_workers']} worker(s); this "
                f"is worker {w} of {nw}: resume with the same num_workers (or save a rank state with "
                "state_dict(delivered=..., batch_size=..., num_workers=...))")
        return int(state["rotation"]), int(state["consumed"])

    def _deliver(self, p: _Pass) -> Iterator[Sample]:
        index = self.index
        shard_ids = index.shard_ids
        for shard, a, b in shard_runs(p.positions, shard_ids):
            url = index.shards[shard]
            part = p.positions[a:b]
            if is_remote(url):
                samples = self._read_stream(url, part, int(index.shard_starts[shard]))
            else:
                samples = self._read_local(url, part)
            for g, sample in zip(part.tolist(), samples, strict=True):
                self._check_key(g, sample["__key__"], url)
                p.consumed += 1  # before yielding: a state taken right after next() includes it
                yield sample
        p.finished = True

    def _read_local(self, url: str, part: NDArray[np.int64]) -> Iterator[Sample]:
        # webdataset's StreamingOpen: a local url's path (urlparse) is also __local_path__.
        path = urlparse(url).path if url.startswith("file:") else url
        offsets = self.index.offsets[part].tolist()
        ranges = list(zip(offsets, self.index.lengths[part].tolist(), strict=True))
        blobs = read_ranges(path, ranges, max_gap=self.max_gap)
        sums = self._checksums(part)
        for i, (off, buf) in enumerate(zip(offsets, blobs, strict=True)):
            if sums is not None:
                check_sample(buf, sums[i], shard=url, key=self._key_of(int(part[i])), offset=off)
            key, members = parse_sample(buf, off, shard=url)
            yield {"__key__": key, "__url__": url, **members, "__local_path__": path}

    def _checksums(self, part: NDArray[np.int64]) -> list[int] | None:
        """The checksums of positions ``part`` (one shard) to verify, or None (verify off, or the
        shard's index has none)."""
        index = self.index
        if not (self.verify and len(part) and index.checksummed[index.shard_ids[part[0]]]):
            return None
        return index.checksums[part].tolist()  # type: ignore[no-any-return]

    def _key_of(self, g: int) -> Callable[[], str]:
        """The index's key of position ``g``, looked up only for an error message."""
        return lambda: (self._index_keys() or {g: f"#{g}"})[g]

    def _read_stream(self, url: str, part: NDArray[np.int64], first: int) -> Iterator[Sample]:
        from webdataset.gopen import gopen

        todo = (part - first).tolist()
        sums = self._checksums(part)
        stream = gopen(url)
        j = 0
        try:
            for i, (sample, members, raw) in enumerate(iter_tar_samples_raw(stream, name=url)):
                if i != todo[j]:
                    continue  # dropped by position: never decoded
                if sums is not None:
                    check_sample(raw, sums[j], shard=url, key=self._key_of(int(part[j])),
                                 offset=sample.offset)
                yield {"__key__": sample.key, "__url__": url, **members}
                j += 1
                if j == len(todo):
                    break
        finally:
            _close(stream, early=j == len(todo))
        if j < len(todo):
            raise StaleIndexError(f"stream {url} ended after fewer samples than its index lists: "
                                  "the shard changed since indexing; run `rsprune-data index` again")

    def _index_keys(self) -> Sequence[str]:
        if self._keys is None:
            keys = self.index.keys
            self._keys = keys if len(keys) == len(self.index) else ()
        return self._keys

    def _check_key(self, g: int, key: str, url: str) -> None:
        self._index_keys()
        if self._keys and self._keys[g] != key:
            raise StaleIndexError(
                f"shard {url}: sample {g - int(self.index.shard_starts[self.index.shard_ids[g]])} "
                f"has key {key!r} but the index says {self._keys[g]!r}: the shard changed since "
                "indexing; run `rsprune-data index` again")

    # -- state
    def _common(self, epoch: int, config: PruneConfig, world_size: int) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "version": STATE_VERSION, "epoch": epoch,
                "config": config.to_dict(), "seed": self.seed,
                "shuffle_shards": self.shuffle_shards, "drop_last": self.drop_last,
                "world_size": world_size, "rank": self.rank,
                "index_fingerprint": str(self.index.fingerprint)}

    def state(self) -> dict[str, Any]:
        if self._pending is not None:
            return dict(self._pending)
        ctl = self._control.read()
        p = self._pass
        if p is not None and p.gen == ctl["gen"]:
            return {**self._common(p.epoch, p.config, p.world.world_size),
                    "worker": p.world.worker, "num_workers": p.world.num_workers,
                    "rotation": p.rotation, "consumed": p.consumed,
                    "num_samples": p.num_samples, "finished": p.finished}
        if ctl["resume"] is not None and int(ctl["resume"]["epoch"]) == int(ctl["epoch"]):
            return dict(ctl["resume"])
        return self.rank_state(0, 1, 0)

    def rank_state(self, delivered: int, batch_size: int, num_workers: int) -> dict[str, Any]:
        for name, value, lo in (("delivered", delivered, 0), ("batch_size", batch_size, 1),
                                ("num_workers", num_workers, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ConfigError(f"`{name}` must be an integer >= {lo}, got {value!r}")
        ctl = self._control.read()
        epoch = int(ctl["epoch"])
        config = self.config_for(epoch, ctl)
        plan = self.plan(epoch, config, self.world_size)
        items = sum(worker_batches(plan.per_rank, num_workers, batch_size))
        if delivered > items:
            raise ConfigError(f"`delivered` must be at most {items} (items per rank in epoch "
                              f"{epoch} with batch_size={batch_size}, num_workers={num_workers}), "
                              f"got {delivered}")
        return {**self._common(epoch, config, self.world_size), "delivered": delivered,
                "batch_size": batch_size, "num_workers": max(1, num_workers), "items": items}

    def load(self, state: dict[str, Any]) -> None:
        from torch.utils.data import get_worker_info

        sd = self._check_state(state)
        if get_worker_info() is not None:  # StatefulDataLoader: this worker's own state
            self._pending = sd
            return
        if _complete(sd):
            self._control.update(resume=sd)
        else:
            self._control.update(resume=sd, epoch=int(sd["epoch"]))

    def _check_state(self, state: dict[str, Any]) -> dict[str, Any]:
        sd = dict(state)
        need = {"format", "epoch", "config", "seed", "shuffle_shards", "drop_last", "world_size",
                "index_fingerprint", "num_workers"}
        need |= ({"delivered", "batch_size", "items"} if "delivered" in sd else
                 {"worker", "rotation", "consumed", "num_samples", "finished"})
        missing = sorted(need - set(sd))
        if sd.get("format") != STATE_FORMAT or missing:
            raise StateDictError(
                f"not a PrunedWebDataset state (format={sd.get('format')!r}, missing keys "
                f"{missing}): pass the dict returned by PrunedWebDataset.state_dict()")
        if sd.get("version") != STATE_VERSION:
            raise StateDictError(
                f"PrunedWebDataset state version {sd.get('version')!r} is not supported (this "
                f"version reads {STATE_VERSION}): resume with the rsprune_data version that saved it")
        mine = {"index_fingerprint": str(self.index.fingerprint), "seed": self.seed,
                "shuffle_shards": self.shuffle_shards, "drop_last": self.drop_last,
                "world_size": self.world_size}
        for name, value in mine.items():
            if sd[name] != value:
                fix = ("load the same shards and index files the state was saved with"
                       if name == "index_fingerprint" else f"construct it with {name}={sd[name]!r}")
                raise StateDictError(f"PrunedWebDataset state has {name}={sd[name]!r} but this "
                                     f"dataset has {value!r}: {fix}")
        if not _complete(sd):
            theirs = PruneConfig.from_dict(sd["config"])
            ours = self.config_for(int(sd["epoch"]))
            if theirs != ours:
                raise StateDictError(
                    f"the state was saved with config {theirs.to_dict()} in epoch {sd['epoch']}, "
                    f"but this dataset would use {ours.to_dict()}: construct it with that config "
                    "(or call set_config(PruneConfig.from_dict(state['config']))) before loading")
        return sd


def _close(stream: Any, *, early: bool) -> None:
    """Close a gopen stream; a ``pipe:`` child killed by SIGPIPE because we stopped early is fine."""
    try:
        stream.close()
    except OSError:
        if not (early and getattr(stream, "status", None) in _SIGPIPE_STATUS):
            raise


# --- the dataset ---------------------------------------------------------------------------------


class PrunedWebDataset(DataPipeline, FluidInterface):
    """An ``IterableDataset`` of the RS-Prune selection of WebDataset shards (module docstring).

    It is a webdataset ``DataPipeline`` with the fluid interface of ``wds.WebDataset`` (both from
    ``webdataset.compat``/``webdataset.pipeline``): ``.decode()``, ``.to_tuple()``, ``.map()``,
    ``.shuffle()``, ``.batched()``, ... return a copy with the stage appended (``DataPipeline.compose``
    is a shallow copy), whose first stage, and so whose epoch, config and state, are this one's.

    Args:
        shards: shard paths or URLs in the order that defines global positions (a string may use
            braces, ``shard-{000000..000099}.tar``), or a loaded :class:`~rsprune_data.PruneIndex`.
        config: a :class:`~rsprune_data.PruneConfig`, a pruning ratio (``PruneConfig(prune_ratio=r)``)
            or a schedule ``epoch -> PruneConfig | float``.
        index_dir: folder of the index files (default: beside each shard; required for URLs).
        shuffle_shards: permute the shard order every epoch from ``(seed, epoch)``.
        seed: seed of that permutation; the same on every rank.
        rank, world_size: override the distributed rank (default: the initialised process group,
            then ``RANK``/``WORLD_SIZE``); read when the dataset is built and at every
            :meth:`set_epoch`, so build it after ``init_process_group`` or pass them.
        drop_last: cut the epoch to ``world_size * floor(n / world_size)`` samples instead of
            padding it to ``world_size * ceil(n / world_size)`` by wrapping around.
        check_stale: refuse indexes of local shards that changed since indexing.
        verify: check every sample's bytes against the per-sample checksum of its index
            (:mod:`rsprune_data.integrity`); ``False`` saves one hash per sample. Keys are always
            checked.
        max_gap: byte gap up to which neighbouring samples of a local shard are read by one call
            (default :data:`DEFAULT_MAX_GAP`, 4 KiB).

    Example:
        >>> ds = PrunedWebDataset("shards/shard-{000000..000021}.tar", 0.85)  # doctest: +SKIP
        >>> loader = DataLoader(ds.decode("pil").to_tuple("jpg;jpeg;png"), num_workers=4)  # doctest: +SKIP
    """

    def __init__(
        self,
        shards: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | PruneIndex,
        config: PruneConfig | float | Schedule,
        *,
        index_dir: str | os.PathLike[str] | None = None,
        shuffle_shards: bool = True,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = False,
        check_stale: bool = True,
        max_gap: int = DEFAULT_MAX_GAP,
        verify: bool = True,
    ) -> None:
        super().__init__()
        check_int("seed", seed, 0)
        check_int("max_gap", max_gap, 0)
        if isinstance(shards, PruneIndex):
            index, load_args = shards, None
        else:
            names: str | list[str] = (os.fspath(shards) if isinstance(shards, str | os.PathLike)
                                      else [os.fspath(s) for s in shards])
            index = PruneIndex.load(names, index_dir, check_stale=check_stale)
            load_args = (names, index_dir, check_stale)
        self._source = _Source(index, load_args, config, seed=int(seed),
                               shuffle_shards=bool(shuffle_shards), drop_last=bool(drop_last),
                               rank=rank, world_size=world_size, max_gap=max_gap,
                               verify=bool(verify))
        # DataPipeline.invoke (webdataset/pipeline.py) calls a plain callable first stage with no
        # argument and iterates what it returns; every later stage gets the previous iterator.
        self.append(self._source)

    def __iter__(self) -> Iterator[Any]:
        # The pass is resolved at the first next(), where torch reports errors with a traceback (an
        # error in iter() kills a persistent worker silently). Until then state_dict() describes
        # the start of the new pass, not the previous one: StatefulDataLoader asks right after iter().
        self._source._pass = None
        return super().__iter__()  # type: ignore[no-any-return]

    # -- epoch and config
    @property
    def index(self) -> PruneIndex:
        """The :class:`~rsprune_data.PruneIndex` of the shards."""
        return self._source.index

    @property
    def epoch(self) -> int:
        """The epoch of the next pass (set by :meth:`set_epoch`; iteration never changes it)."""
        return int(self._source._control.read()["epoch"])

    @property
    def config(self) -> PruneConfig:
        """The config of the current epoch (a schedule evaluated at :attr:`epoch`)."""
        return self._source.config_for(self.epoch)

    @property
    def selected(self) -> NDArray[np.int64]:
        """Sorted global positions that :attr:`config` selects (all ranks together)."""
        return self._source.selected(self.config)

    @property
    def num_samples(self) -> int:
        """Samples every rank delivers in the current epoch (padding or ``drop_last`` included)."""
        return per_rank(int(self.selected.shape[0]), self._source.world_size, self._source.drop_last)

    def num_batches(self, batch_size: int, num_workers: int = 0) -> int:
        """Items every rank's loader yields this epoch when each worker batches its own samples
        (``DataLoader(batch_size=b)`` or ``.batched(b)``, partial batches kept): the same on all ranks.
        """
        return sum(worker_batches(self.num_samples, num_workers, batch_size))

    def set_epoch(self, epoch: int) -> None:
        """Use epoch ``epoch`` from the next pass on, in this process and in every worker."""
        check_int("epoch", epoch, 0)
        self._source.refresh_world()
        resume = self._source._control.read()["resume"]
        keep = resume is not None and int(resume["epoch"]) == int(epoch)
        self._source._control.update(epoch=int(epoch), resume=resume if keep else None)

    def set_config(self, config: PruneConfig | float | Schedule) -> None:
        """Use ``config`` (a PruneConfig, ratio or schedule) from the next pass on, everywhere.

        A loaded resume position is abandoned. A schedule set here reaches workers that start
        after the call; persistent workers that already run raise :class:`ConfigError`.
        """
        self._source.set_config(config)

    def set_prune_ratio(self, prune_ratio: float) -> None:
        """Shorthand for ``set_config(config.replace(prune_ratio=...))`` (ends any schedule)."""
        self.set_config(self.config.replace(prune_ratio=prune_ratio))

    # -- state
    def state_dict(self, *, delivered: int | None = None, batch_size: int = 1,
                   num_workers: int = 0) -> dict[str, Any]:
        """The resume position, JSON-serialisable (see the module docstring).

        Without arguments: the pass of this process (``num_workers=0``, or inside a worker, which is
        how ``StatefulDataLoader`` calls it). With ``delivered``: a rank position for a plain
        ``DataLoader`` with workers.

        Args:
            delivered: items this rank's loader has handed to the training loop in the current
                epoch (batches when it batches).
            batch_size: samples per item (``DataLoader(batch_size=...)`` or ``.batched(...)``).
            num_workers: the loader's ``num_workers``.
        """
        if delivered is None:
            return self._source.state()
        return self._source.rank_state(delivered, batch_size, num_workers)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict`; raises :class:`StateDictError` on a mismatch."""
        self._source.load(state_dict)

    def __repr__(self) -> str:
        s = self._source
        return (f"PrunedWebDataset({len(s.index.shards)} shards, epoch={self.epoch}, "
                f"rank={s.rank}/{s.world_size}, seed={s.seed}, "
                f"shuffle_shards={s.shuffle_shards}, drop_last={s.drop_last})")
