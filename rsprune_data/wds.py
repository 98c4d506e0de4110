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

**Reading** (:mod:`rsprune_data.reading`). Local shards (paths, ``file://``) are read by byte
range from the index: neighbours within ``max_gap`` merged into one ``pread``, kernel readahead
replaced by ``WILLNEED`` of exactly the planned runs, samples cut out of each run's buffer. URLs
(``https://``, ``s3://``, ``gs://``, ``hf://``, any fsspec protocol; options in
``storage_options``) are read by byte range too, with ``concurrency`` ranges in flight and retries
(:class:`~rsprune_data.reading.RetryPolicy`); a range that keeps failing raises
:class:`~rsprune_data.reading.RemoteReadError` naming the URL, never a silent gap. ``pipe:``
streams are read in one pass and unselected samples are dropped by their position in the tar
without being decoded; a stream is closed as soon as its last selected sample has been read. A
shard without a selected sample in a worker's span is never opened. Every delivered ``__key__``
is checked against the index, and
with ``verify=True`` (the default) every sample's bytes against its per-sample checksum
(:func:`rsprune_data.integrity.check_sample`, in :func:`rsprune_data.reading.check_sample`, where
the sample is cut out).

**Order and split (one epoch, pure numpy: :func:`epoch_plan`).** Shards are permuted by
``rng([seed, epoch])`` (``shuffle_shards``) and laid out one after the other; the samples of every
``sample_window`` consecutive shards of that order (default 8) are then permuted together by
``rng([seed, epoch, 1, window])``, so every epoch has a new sample-level order, the same on every
rank and for every worker count, even with a single shard (``sample_window=0``: tar order inside
shards). That is the global sequence. Like ``DistributedSampler`` it is padded by
wrapping around from its start to ``R * ceil(n / R)`` items, or cut to ``R * floor(n / R)`` with
``drop_last``, so every one of the ``R`` ranks delivers exactly the same number of samples. Rank ``r``
takes the ``r``-th contiguous span of that sequence and its ``W`` DataLoader workers cut the span
into ``W`` contiguous pieces whose lengths differ by at most one (Megatron-Energon's global split
of samples over all workers): a piece may start or end inside a shard, so ``R * W`` may exceed the
number of shards (with webdataset's shard-per-worker split that case leaves workers empty or hangs,
webdataset issue #188).

**Reads in that order stay local.** A worker takes its next block of up to 1024 items and 64 MiB
(never across a window, so it touches at most ``sample_window`` shards, each opened once per block),
sorts them by (shard, offset) so that neighbours coalesce, reads them, and yields them in the
planned order. Remote (URL) pieces of a block are fetched together in one window of
``concurrency`` requests, the next block's while one is delivered. A ``pipe:`` stream is read from
its start for every block that needs it, so for streams a block is a whole window's share of the
worker's span (held in memory).

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
its buffer at the save point, so a state saved behind one is refused on loading; ``.batched(n)``
here yields a batch as soon as it is full (webdataset's reads one sample ahead, which a state would
count as delivered). A state loaded into a fresh dataset on which ``set_epoch`` was never called
(``StatefulDataLoader`` loads it inside each worker) continues its own epoch. As with :class:`~rsprune_data.PrunedSampler` the training loop owns the
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
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from numpy.typing import NDArray
from webdataset.compat import FluidInterface
from webdataset.filters import default_collation_fn, pipelinefilter
from webdataset.pipeline import DataPipeline

from ._control import _Control
from ._validate import check_int
from .config import PruneConfig, Schedule, as_config
from .errors import ConfigError, StaleIndexError, StateDictError
from .index import KeyList, PruneIndex, expand_shards
from .partition import per_rank
from .plan import check_servable
from .reading import (
    DEFAULT_LOCAL_MAX_GAP,
    Piece,
    ReadOptions,
    fetch_remote,
    read_options,
    read_pieces,
    shard_kind,
)
from .reading._threads import process_pool
from .resume import check_config, check_format, check_same, state_header
from .state_check import check_wds_state, state_int
from .stream_plan import EpochPlan, epoch_plan, shard_runs, worker_batches
from .world import World, distributed_rank, get_world
from .wrappers import refuse_wrapper

__all__ = [
    "DEFAULT_MAX_GAP",
    "DEFAULT_SAMPLE_WINDOW",
    "EpochPlan",
    "PrunedWebDataset",
    "epoch_plan",
    "worker_batches",
]

#: Default ``max_gap`` of :class:`PrunedWebDataset`: merge samples that touch or are less than a
#: page apart. Bridging wider gaps buys nothing on a local disk and reads far more bytes when tiles
#: are small (``benchmarks/streaming_io.py``, Harvey tiles of ~6.5 KB, 85% pruned, warm cache:
#: 0.150x of the shard bytes and 29.5x the plain stream at 0-4 KiB; 0.589x and 24.9x at tario's
#: 64 KiB). On network filesystems, where a round trip costs more, pass a larger ``max_gap``.
DEFAULT_MAX_GAP = DEFAULT_LOCAL_MAX_GAP
STATE_FORMAT = "rsprune-wds"
STATE_VERSION = 2  # 2: sample_window
_CACHE_SIZE = 4
#: Default ``sample_window`` of :class:`PrunedWebDataset`: shards whose samples are permuted together.
DEFAULT_SAMPLE_WINDOW = 8
#: Items a worker reads together, sorted by (shard, offset), before yielding them in planned order.
#: (Shards are opened, runs planned and keys decoded once per block and shard:
#: ``benchmarks/streaming_io.py --order-only --ratios 0.85 --repeat 7 --read-block B``, warm,
#: sample_window=8: 118k samples/s at 256, 137k at 1024, against 145k in shard order.)
_READ_BLOCK = 1024
#: ... and at most this many bytes (one larger sample is a block of its own): a block is held in
#: memory while it is delivered, two for remote shards (the next one is fetched ahead).
_READ_BLOCK_BYTES = 64 << 20
_DONE_SLOTS = 256  # workers tracked for the "iterated again without set_epoch" warning

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
    positions: NDArray[np.int64]  # what is left to deliver, in the planned order
    blocks: list[tuple[int, int]]  # read blocks of ``positions`` (EpochPlan.blocks)
    finished: bool = False


def _complete(state: dict[str, Any]) -> bool:
    if "delivered" in state:
        return int(state["delivered"]) >= int(state["items"])
    return bool(state["finished"]) or int(state["consumed"]) >= int(state["num_samples"])


# --- the source stage ----------------------------------------------------------------------------


class _Source:
    """The pipeline's first stage: called with no argument, returns an iterator of sample dicts."""

    def __init__(
        self,
        index: PruneIndex,
        load_args: tuple[Any, ...] | None,
        config: Any,
        *,
        seed: int,
        shuffle_shards: bool,
        drop_last: bool,
        rank: int | None,
        world_size: int | None,
        read: ReadOptions,
        sample_window: int,
        verify: bool = True,
    ) -> None:
        self._index: PruneIndex | None = index
        self.verify = verify
        self._load_args = load_args  # (shards, index_dir, check_stale, fingerprint): reloads
        self.seed, self.shuffle_shards, self.drop_last = seed, shuffle_shards, drop_last
        self.read = read
        self.sample_window = sample_window
        # A `pipe:` stream is read from its start for each block that needs it, so streams read
        # whole windows; seekable shards (local, fsspec URLs) read blocks of _READ_BLOCK items.
        self._block = 0 if any(shard_kind(u) == "stream" for u in index.shards) else _READ_BLOCK
        self._explicit = (rank, world_size)
        self.rank, self.world_size = distributed_rank(rank, world_size)
        self._schedule: Schedule | None = None
        self._schedule_id = 0
        self._control = _Control(
            {
                "gen": 0,
                "epoch": 0,
                "epoch_set": False,
                "config": None,
                "schedule": None,
                "resume": None,
            }
        )
        self.set_config(config)
        self._selections: OrderedDict[PruneConfig, NDArray[np.int64]] = OrderedDict()
        self._plan_key: tuple[Any, ...] | None = None
        self._plan: EpochPlan | None = None
        self._keys: KeyList | tuple[()] | None = None
        self._pending: dict[str, Any] | None = None  # a state loaded inside a DataLoader worker
        self._pass: _Pass | None = None
        self._warned = False  # "iterated again without set_epoch", once per process
        # Per worker slot, the control generation of its last complete pass, in shared memory so
        # that the next epoch's fresh workers (persistent_workers=False) see it too.
        import torch

        self._done_gen = torch.full((_DONE_SLOTS,), -1, dtype=torch.int64).share_memory_()  # type: ignore[no-untyped-call]

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
            shards, index_dir, check_stale, fingerprint = self._load_args or ((), None, True, "")
            index = PruneIndex.load(shards, index_dir, check_stale=check_stale)
            if index.fingerprint != fingerprint:
                raise StaleIndexError(
                    f"the indexes of {len(shards)} shard(s) changed after the dataset was built "
                    "(a worker re-read them): build the dataset again after re-indexing"
                )
            self._index = index
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
            check_servable(self.index, cfg)  # here, not at the first sample in a worker
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
            self._plan = epoch_plan(
                self.selected(config),
                self.index.shard_starts,
                seed=self.seed,
                epoch=epoch,
                shuffle_shards=self.shuffle_shards,
                world_size=world_size,
                drop_last=self.drop_last,
                sample_window=self.sample_window,
            )
            self._plan_key = key
        return self._plan

    # -- a pass
    def __call__(self) -> Iterator[Sample]:
        return self._deliver(self._begin())

    def guard(self) -> None:
        refuse_wrapper(f"PrunedWebDataset(world_size={self.world_size})", self.world_size)

    def _begin(self) -> _Pass:
        self.guard()
        world = self.world()
        ctl = self._control.read()
        slot = world.worker % _DONE_SLOTS
        if int(self._done_gen[slot]) == int(ctl["gen"]) and not self._warned:
            # A trainer that never calls set_epoch (Lightning does not, for an IterableDataset):
            # the same selection and order every epoch, a schedule stuck at its first epoch.
            self._warned = True
            warnings.warn(
                f"PrunedWebDataset is iterated again at epoch {ctl['epoch']} without set_epoch(): "
                "this pass repeats the last one's order and config. Call ds.set_epoch(epoch) "
                "before every epoch, or use rsprune_data.integrations (PrunedLoader, "
                "prepare_loader, PrunedDataModule), which do",
                RuntimeWarning,
                stacklevel=3,
            )
        epoch = int(ctl["epoch"])
        resume, self._pending = (self._pending or ctl["resume"]), None
        if (
            resume is not None
            and int(resume["epoch"]) != epoch
            and not ctl["epoch_set"]
            and not _complete(resume)
        ):
            # A fresh dataset handed a mid-epoch state (StatefulDataLoader loads it inside each
            # worker) and no set_epoch() call: the state's epoch is the one to continue.
            epoch = int(resume["epoch"])
        if resume is not None and int(resume["epoch"]) != epoch:
            if not _complete(resume):
                warnings.warn(
                    f"a state loaded for epoch {resume['epoch']} is ignored: this pass is epoch "
                    f"{epoch}. Call set_epoch({resume['epoch']}) to resume it.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            resume = None
        config = self.config_for(epoch, ctl)
        if resume is not None and PruneConfig.from_dict(resume["config"]) != config:
            raise StateDictError(
                f"the loaded state's config {resume['config']} is not the "
                f"config of epoch {epoch}, {config.to_dict()}"
            )
        plan = self.plan(epoch, config, world.world_size)
        rotation, skip = (0, 0) if resume is None else self._resume_point(resume, world)
        start, stop = plan.worker_span(
            world.rank, (world.worker + rotation) % world.num_workers, world.num_workers
        )
        skip = min(skip, stop - start)
        positions = plan.positions(start + skip, stop)
        p = _Pass(
            epoch,
            int(ctl["gen"]),
            config,
            world,
            rotation,
            skip,
            stop - start,
            positions,
            plan.blocks(
                start + skip,
                stop,
                self._block,
                sizes=self.index.lengths[positions],
                max_bytes=_READ_BLOCK_BYTES,
            ),
        )
        self._pass = p
        return p

    @staticmethod
    def _resume_point(state: dict[str, Any], world: World) -> tuple[int, int]:
        """``(rotation, samples to skip)`` of this worker for a loaded state."""
        w, nw = world.worker, world.num_workers
        if int(state["world_size"]) != world.world_size:
            raise StateDictError(
                f"the state was saved with world_size={state['world_size']}, "
                f"this run has {world.world_size}: resume on as many ranks"
            )
        if "delivered" in state:  # items handed out by the loader, one per worker in turn
            k, b = int(state["delivered"]), int(state["batch_size"])
            if k == 0:
                return 0, 0
            if int(state["num_workers"]) != nw:
                raise StateDictError(
                    f"the state was saved with num_workers={state['num_workers']}"
                    f", this loader has {nw}: resume with the same num_workers"
                )
            s = k % nw
            v = (w + s) % nw
            return s, (k // nw + (1 if v < s else 0)) * b
        if int(state["num_workers"]) != nw or int(state["worker"]) != w:
            raise StateDictError(
                f"the state is worker {state['worker']}'s of {state['num_workers']} worker(s); this "
                f"is worker {w} of {nw}: resume with the same num_workers (or save a rank state with "
                "state_dict(delivered=..., batch_size=..., num_workers=...))"
            )
        return int(state["rotation"]), int(state["consumed"])

    def _deliver(self, p: _Pass) -> Iterator[Sample]:
        # positions (planned order) -> blocks -> sorted by (shard, offset) -> runs per shard ->
        # coalesced reads -> samples back in the planned order.
        blocks = [p.positions[a:b] for a, b in p.blocks]
        if any(shard_kind(u) == "remote" for u in self.index.shards):
            reads: Iterator[list[Sample]] = self._read_ahead(blocks)
        else:
            reads = (self._read_block(block, {}) for block in blocks)
        for samples in reads:
            for sample in samples:
                p.consumed += 1  # before yielding: a state taken right after next() includes it
                yield sample
        p.finished = True
        self._done_gen[p.world.worker % _DONE_SLOTS] = p.gen

    def _read_ahead(self, blocks: list[NDArray[np.int64]]) -> Iterator[list[Sample]]:
        """Blocks in order, the remote part of the next block fetched while one is delivered.

        At most two blocks' windows are in flight (``2 * concurrency`` requests); the fetching
        thread only fetches bytes, the samples are cut in this thread with the rest of the block.
        """
        if not blocks:
            return
        self._expected_keys(blocks[0][:0])  # load the keys here, not in the fetching thread
        pool = process_pool("blocks", 1)
        ahead: Future[dict[int, list[bytes]]] = pool.submit(self._fetch_remote, blocks[0])
        try:
            for k, block in enumerate(blocks):
                fetched = ahead.result()
                if k + 1 < len(blocks):
                    ahead = pool.submit(self._fetch_remote, blocks[k + 1])
                yield self._read_block(block, fetched)
        finally:
            ahead.cancel()

    def _pieces(self, ranked: NDArray[np.int64]) -> list[tuple[int, int, int, Piece]]:
        """``(shard, a, b, piece)`` per shard of a sorted block: ``ranked[a:b]`` is ``piece``."""
        index = self.index
        out = []
        for shard, a, b in shard_runs(ranked, index.shard_ids):
            part = ranked[a:b]
            sums = self._sums(part, shard)
            numbers = part - int(index.shard_starts[shard])
            piece = Piece(
                index.shards[shard],
                index.offsets[part].tolist(),
                index.lengths[part].tolist(),
                self._expected_keys(part),
                sums,
                numbers.tolist(),
                None if sums is None else index.members(shard, numbers),
            )
            out.append((shard, a, b, piece))
        return out

    def _fetch_remote(self, block: NDArray[np.int64]) -> dict[int, list[bytes]]:
        """The run buffers of ``block``'s remote (URL) pieces, by shard, fetched together.

        The pieces go out in one window of ``concurrency`` requests, so a store's round trips
        overlap across the shards of a block instead of being paid piece after piece (a block
        touches up to ``sample_window`` shards; ``benchmarks/remote_io.py``).
        """
        index = self.index
        ranked = np.sort(block, kind="stable")
        # only the ranges: keys and checksums are checked where the block is cut
        remote: list[tuple[int, Piece]] = []
        for shard, a, b in shard_runs(ranked, index.shard_ids):
            url, part = index.shards[shard], ranked[a:b]
            if shard_kind(url) == "remote":
                offsets, lengths = index.offsets[part].tolist(), index.lengths[part].tolist()
                remote.append((shard, Piece(url, offsets, lengths, ())))
        if not remote:
            return {}
        got = fetch_remote([p for _, p in remote], self.read)
        return {shard: bufs for (shard, _), bufs in zip(remote, got, strict=True)}

    def _read_block(
        self, block: NDArray[np.int64], fetched: dict[int, list[bytes]]
    ) -> list[Sample]:
        """The samples at ``block`` (global positions, any order, repeats allowed), in that order;
        ``fetched`` holds the run buffers of its remote pieces (:meth:`_fetch_remote`)."""
        order = np.argsort(block, kind="stable")
        pieces = self._pieces(block[order])
        got = read_pieces(
            [p[3] for p in pieces],
            self.read,
            fetched={k: fetched[p[0]] for k, p in enumerate(pieces) if p[0] in fetched},
            local_paths=True,  # webdataset's StreamingOpen: a local url's path
        )
        if block.shape[0] < 2 or bool((block[1:] > block[:-1]).all()):  # already in file order
            return [sample for samples in got for sample in samples]
        out: list[Sample | None] = [None] * int(block.shape[0])
        for (_, a, b, _), samples in zip(pieces, got, strict=True):
            for slot, sample in zip(order[a:b].tolist(), samples, strict=True):
                out[slot] = sample
        return out  # type: ignore[return-value]

    def _expected_keys(self, part: NDArray[np.int64]) -> list[str | None]:
        if self._keys is None:
            keys = self.index.keys
            self._keys = keys if len(keys) == len(self.index) else ()
        if isinstance(self._keys, KeyList):
            return list(self._keys.take(part))
        return [None] * int(part.shape[0])

    def _sums(self, part: NDArray[np.int64], shard: int) -> list[int | None] | None:
        """The index's checksums of ``part`` (one shard), or None when they are not verified."""
        index = self.index
        if not self.verify or not index.checksummed[shard]:
            return None
        sums: list[int | None] = index.checksums[part].tolist()  # uint64 -> Python int
        return sums

    # -- state
    def _common(self, epoch: int, config: PruneConfig, world_size: int) -> dict[str, Any]:
        return {
            **state_header(STATE_FORMAT, STATE_VERSION, epoch, config, self.index.fingerprint),
            "seed": self.seed,
            "shuffle_shards": self.shuffle_shards,
            "sample_window": self.sample_window,
            "drop_last": self.drop_last,
            "world_size": world_size,
            "rank": self.rank,
        }

    def state(self) -> dict[str, Any]:
        if self._pending is not None:
            return dict(self._pending)
        ctl = self._control.read()
        p = self._pass
        if p is not None and p.gen == ctl["gen"]:
            return {
                **self._common(p.epoch, p.config, p.world.world_size),
                "worker": p.world.worker,
                "num_workers": p.world.num_workers,
                "rotation": p.rotation,
                "consumed": p.consumed,
                "num_samples": p.num_samples,
                "finished": p.finished,
            }
        if ctl["resume"] is not None and int(ctl["resume"]["epoch"]) == int(ctl["epoch"]):
            return dict(ctl["resume"])
        return self.rank_state(0, 1, 0)

    def rank_state(self, delivered: int, batch_size: int, num_workers: int) -> dict[str, Any]:
        delivered = check_int("delivered", delivered, 0)
        batch_size = check_int("batch_size", batch_size, 1)
        num_workers = check_int("num_workers", num_workers, 0)
        ctl = self._control.read()
        epoch = int(ctl["epoch"])
        config = self.config_for(epoch, ctl)
        plan = self.plan(epoch, config, self.world_size)
        items = sum(worker_batches(plan.per_rank, num_workers, batch_size))
        if delivered > items:
            raise ConfigError(
                f"`delivered` must be at most {items} (items per rank in epoch "
                f"{epoch} with batch_size={batch_size}, num_workers={num_workers}), "
                f"got {delivered}"
            )
        return {
            **self._common(epoch, config, self.world_size),
            "delivered": delivered,
            "batch_size": batch_size,
            "num_workers": max(1, num_workers),
            "items": items,
        }

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
        required = {
            "seed",
            "shuffle_shards",
            "sample_window",
            "drop_last",
            "world_size",
            "num_workers",
        }
        required |= (
            {"delivered", "batch_size", "items"}
            if "delivered" in state
            else {"worker", "rotation", "consumed", "num_samples", "finished"}
        )
        check_format(
            state,
            fmt=STATE_FORMAT,
            version=STATE_VERSION,
            required=required,
            what="PrunedWebDataset",
        )
        sd = check_wds_state(state, STATE_FORMAT, STATE_VERSION)  # every field: type and range
        sd["sample_window"] = state_int(sd, "sample_window", "PrunedWebDataset", 0)
        if sd.get("buffered"):
            raise StateDictError(
                f"this PrunedWebDataset state was saved behind a .shuffle({sd['buffered']}) stage, "
                "whose buffer held samples counted as delivered that the model never saw: resume "
                "would lose them. Drop .shuffle(n): PrunedWebDataset already delivers a new "
                "sample-level order every epoch (sample_window), and resume is exact without it"
            )
        check_same(
            sd,
            {
                "index_fingerprint": str(self.index.fingerprint),
                "seed": self.seed,
                "shuffle_shards": self.shuffle_shards,
                "sample_window": self.sample_window,
                "drop_last": self.drop_last,
                "world_size": self.world_size,
            },
            "PrunedWebDataset",
        )
        if not _complete(sd):
            check_config(sd, self.config_for(int(sd["epoch"])), "PrunedWebDataset")
        return sd


def _batched_exact_stage(
    data: Iterator[Any], batchsize: int, collation_fn: Any, partial: bool
) -> Iterator[Any]:
    batch: list[Any] = []
    for sample in data:
        batch.append(sample)
        if len(batch) == batchsize:  # yield before pulling the next sample (no look-ahead)
            yield batch if collation_fn is None else collation_fn(batch)
            batch = []
    if batch and partial:
        yield batch if collation_fn is None else collation_fn(batch)


_batched_exact = pipelinefilter(_batched_exact_stage)


# --- the dataset ---------------------------------------------------------------------------------


class PrunedWebDataset(DataPipeline, FluidInterface):  # type: ignore[misc]  # untyped webdataset
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
        sample_window: permute the samples of every ``sample_window`` consecutive shards of the
            epoch's shard order (a new sample-level order per epoch; module docstring); 0 keeps
            tar order inside shards. Default :data:`DEFAULT_SAMPLE_WINDOW`.
        storage_options: fsspec options for URL shards (credentials, ``client_kwargs``, ...).
        read: every other reading knob (:class:`~rsprune_data.reading.ReadOptions`: remote gap,
            concurrency, retries, readahead); ``max_gap`` and ``storage_options`` override it.

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
        max_gap: int | None = None,
        verify: bool = True,
        sample_window: int = DEFAULT_SAMPLE_WINDOW,
        storage_options: dict[str, Any] | None = None,
        read: ReadOptions | None = None,
    ) -> None:
        super().__init__()
        check_int("seed", seed, 0)
        check_int("sample_window", sample_window, 0)
        self.batch_size: int | None = None  # set by .batched(n), read by the integrations
        self._buffered = 0  # size of a .shuffle(n) buffer downstream (resume refuses it)
        options = read_options(read)
        if max_gap is not None:
            options = replace(options, max_gap=check_int("max_gap", max_gap, 0))
        if storage_options is not None:
            options = replace(options, storage_options=storage_options)
        if isinstance(shards, PruneIndex):
            index, load_args = shards, None
        else:
            # patterns expanded once, here: a spawned worker reloads exactly these shards
            names = expand_shards(shards)
            index = PruneIndex.load(names, index_dir, check_stale=check_stale)
            load_args = (names, index_dir, check_stale, index.fingerprint)
        self._source = _Source(
            index,
            load_args,
            config,
            seed=int(seed),
            shuffle_shards=bool(shuffle_shards),
            drop_last=bool(drop_last),
            rank=rank,
            world_size=world_size,
            read=options,
            sample_window=int(sample_window),
            verify=bool(verify),
        )
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
        return per_rank(
            int(self.selected.shape[0]), self._source.world_size, self._source.drop_last
        )

    def num_batches(self, batch_size: int, num_workers: int = 0) -> int:
        """Items every rank's loader yields this epoch when each worker batches its own samples
        (``DataLoader(batch_size=b)`` or ``.batched(b)``, partial batches kept): the same on all ranks.
        """
        return sum(worker_batches(self.num_samples, num_workers, batch_size))

    # -- stages whose look-ahead would break resume
    def batched(
        self, batchsize: int, collation_fn: Any = default_collation_fn, partial: bool = True
    ) -> PrunedWebDataset:
        """Batches of ``batchsize`` samples, like ``wds.WebDataset.batched``, without look-ahead.

        webdataset's ``batched`` pulls sample ``n + 1`` before it yields a batch of ``n``, so a
        resume state taken after a batch would count a sample the model never saw. This stage
        yields as soon as a batch is full: the state after ``k`` batches is exactly ``k * n``.
        """
        check_int("batchsize", batchsize, 1)
        out: PrunedWebDataset = self.compose(_batched_exact(batchsize, collation_fn, partial))
        out.batch_size = int(batchsize)
        return out

    def shuffle(self, size: int, **kw: Any) -> PrunedWebDataset:
        """webdataset's buffer shuffle; a resume state saved behind it is refused on loading.

        Its buffer holds samples that the source counts as delivered, so resuming would lose
        them. Rarely needed: the source already delivers a new sample-level order every epoch.
        """
        out: PrunedWebDataset = super().shuffle(size, **kw)
        if size > 1:
            out._buffered = int(size)
        return out

    def set_epoch(self, epoch: int) -> None:
        """Use epoch ``epoch`` from the next pass on, in this process and in every worker."""
        check_int("epoch", epoch, 0)
        self._source.refresh_world()
        self._source.guard()
        resume = self._source._control.read()["resume"]
        keep = resume is not None and int(resume["epoch"]) == int(epoch)
        self._source._control.update(
            epoch=int(epoch), epoch_set=True, resume=resume if keep else None
        )

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
    def state_dict(
        self, *, delivered: int | None = None, batch_size: int = 1, num_workers: int = 0
    ) -> dict[str, Any]:
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
        state = (
            self._source.state()
            if delivered is None
            else self._source.rank_state(delivered, batch_size, num_workers)
        )
        if self._buffered:
            state["buffered"] = self._buffered
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict`; raises :class:`StateDictError` on a mismatch."""
        self._source.load(state_dict)

    def __repr__(self) -> str:
        s = self._source
        return (
            f"PrunedWebDataset({len(s.index.shards)} shards, epoch={self.epoch}, "
            f"rank={s.rank}/{s.world_size}, seed={s.seed}, "
            f"shuffle_shards={s.shuffle_shards}, drop_last={s.drop_last})"
        )
