"""Delivering the RS-Prune selection from local shards: PrunedWebDataset vs a filtered plain stream.

    python benchmarks/streaming_io.py [--src /work/shared/data/harvey] [--cache /tmp/rsprune_bench]
        [--shard-size 1000] [--ratios 0.5 0.7 0.85 0.9] [--repeat 3] [--gaps 0 4096 65536]
        [--sample-windows 8] [--order-only] [--peers] [--peers-only] [--verify-only]
        [--read-block 1024] [--out results/streaming_io.json]

Both sides deliver exactly the same samples (checked) as raw webdataset dicts, in one process,
nothing decoded:

* ``ours``: ``PrunedWebDataset(shards, config, shuffle_shards=False)``: byte-range reads of the
  selected samples (neighbours within ``max_gap`` bytes merged into one ``pread``);
* ``stream``: ``wds.WebDataset(shards, shardshuffle=False).select(lambda s: s["__key__"] in keep)``,
  what a webdataset user writes today: every sample is read and grouped, then most are dropped.

Per prune ratio and cache state: wall seconds (median of ``--repeat``), samples/s, and bytes read
from ``/proc/self/io`` (``rchar``: bytes returned by read calls; ``read_bytes``: bytes fetched from
the block device), with ``stream / ours`` ratios. "cold" empties the page cache before each run:
``sync`` then ``echo 3 > /proc/sys/vm/drop_caches`` where that is allowed (root), else
``posix_fadvise(POSIX_FADV_DONTNEED)`` on every shard (unprivileged); the JSON records which.
The sampler path (map-style ``PrunedShardDataset`` + ``PrunedSampler``, ``DataLoader`` with 2
workers, and with 0 workers where batches go through ``__getitems__``) and ``PrunedWebDataset``
through the same loader are measured warm, against the stream. ``--peers`` adds MosaicML
streaming (an MDS rewrite of the subset) and litdata (an ``optimize`` of the subset), one rewrite
per ratio (timed), and Megatron-Energon over the original shards, nothing rewritten: the shards
symlinked into a scratch folder under ``--cache`` (so ``.nv-meta/`` and the ``.tar.idx`` files stay
out of the shard cache), ``energon prepare`` there (``WebdatasetPreparator.prepare_dataset``, one
split part holding every shard; timed as ``prepare_seconds``, paid once per shard set), then per
ratio a split config whose ``exclude`` list names every sample outside the subset as
``<shard>/<key>`` (timed as ``rewrite_seconds``, what a user pays per subset), read through
``get_val_dataset`` + ``get_loader`` (one pass, no shuffle, ``num_workers=0``, a
``CrudeWebdataset`` with a pass-through cooker and no decoder). Then best-of-``--repeat``
iteration of raw samples in one process, with the bytes read (``rchar``: ``read`` calls only, so
a peer that maps its files, like litdata, shows almost none); a peer that is not installed is
reported as skipped. ``--peers-only`` measures just the peers, against ``PrunedWebDataset`` warm
at the default ``max_gap``.

Checksum verification (on by default in both loaders): ``ours`` at the default ``max_gap`` and the
in-process map-style dataset are also run with ``verify=False`` (warm cache), and the cost of
verifying is printed as ``verify / no-verify`` time (best of ``--repeat`` for both, interleaved).
``--verify-only`` measures just that.

**Sample-level order** (``--sample-windows``, ``--order-only`` measures only this): the same
``PrunedWebDataset`` with shuffled shards, delivering a new sample-level order (``sample_window=w``:
samples of ``w`` consecutive shards permuted, read in sorted blocks) against today's shard order
(``sample_window=0``: tar order inside shards), warm and cold (cold: ``posix_fadvise(DONTNEED)`` on
every shard before each run), best of ``--repeat`` with the spread
(min-max) of both sides and the ratio of the bests.

The shards are ``rsprune_data.pack.pack_folder`` output of ``--src`` (real JPEG tiles), written once
to ``--cache``. The index files hold real byte ranges and keys (``tario.scan_tar``) but synthetic
scores (uniform entropy, 50 random clusters, random similarity): for I/O what matters is where the
selected samples sit, and random scores scatter them uniformly over all shards, the worst case for
range reads. Selection: ``PruneConfig(prune_ratio=r, entropy_filter="none")`` (strategy rsprune).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from rsprune_data import PruneConfig, PrunedSampler, PruneIndex
from rsprune_data import index as idx
from rsprune_data.integrity import range_checksums
from rsprune_data.layout import DIGEST_KEY, EXTS_KEY, encode_members
from rsprune_data.reading import DEFAULT_LOCAL_MAX_GAP
from rsprune_data.tario import scan_tar

NUM_CLUSTERS = 50


def prepare(src: Path, cache: Path, shard_size: int) -> list[str]:
    """Pack ``src`` into shards under ``cache`` and write synthetic-score indexes (once)."""
    shard_dir = cache / f"shards-{shard_size}"
    cache.mkdir(parents=True, exist_ok=True)
    shards = sorted(str(p) for p in shard_dir.glob("shard-*.tar"))
    if not shards:
        from rsprune_data.pack import pack_folder

        shards = [str(p) for p in pack_folder(src, shard_dir, shard_size=shard_size).shards]
    rng = np.random.default_rng(0)
    for shard in shards:
        out = idx.index_path_for(shard)
        meta = idx.read_metadata(out) if out.exists() else {}
        if idx.has_checksums(meta) and DIGEST_KEY in meta:  # current: checksums and a layout
            continue
        ts = scan_tar(shard)
        n = len(ts)
        arrays = {
            "entropy": rng.uniform(5.0, 8.0, n),
            "nodata": np.zeros(n),
            "cluster_id": rng.integers(0, NUM_CLUSTERS, n),
            "similarity": rng.random(n),
            "valid": np.ones(n),
            "reason": np.zeros(n),
            "offset": [t.offset for t in ts],
            "length": [t.length for t in ts],
            "checksum": range_checksums(shard, [(t.offset, t.length) for t in ts]),
            **idx.encode_keys([t.key for t in ts]),
        }
        layout = encode_members([t.members for t in ts], [t.offset for t in ts])
        assert layout is not None
        arrays.update(layout[0])
        meta = {
            **idx.shard_metadata(shard),
            "encoder": "synthetic",
            "centroids_digest": "synthetic",
            "num_clusters": str(NUM_CLUSTERS),
            "reasons": json.dumps(["ok"]),
            EXTS_KEY: layout[1],
        }
        idx.write_index(out, arrays, meta)
    return shards


def proc_io() -> dict[str, int]:
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(": ") for line in f.read().splitlines())}


def evict(paths: list[str], *, drop_caches: bool) -> None:
    """Empty the page cache of ``paths``: ``drop_caches`` when allowed, else per-file fadvise."""
    os.sync()  # dirty pages (freshly packed shards) cannot be dropped
    if drop_caches:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(paths: list[str]) -> None:
    for p in paths:
        with open(p, "rb") as f:
            while f.read(1 << 22):
                pass


def drop_caches_allowed() -> bool:
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False


def timed(fn: Callable[[], list[str]]) -> dict[str, Any]:
    a = proc_io()
    t0 = time.perf_counter()
    keys = fn()
    dt = time.perf_counter() - t0
    b = proc_io()
    return {
        "seconds": dt,
        "keys": keys,
        "rchar": b["rchar"] - a["rchar"],
        "read_bytes": b["read_bytes"] - a["read_bytes"],
    }


def page_floor(index: PruneIndex, cfg: PruneConfig, max_gap: int) -> int:
    """Bytes in the 4 KiB pages that the coalesced runs of the selection touch: what a buffered
    read pulls from the device at least, however readahead is set."""
    from rsprune_data.reading import coalesce

    sel = np.sort(index.select(cfg))
    total = 0
    for shard in np.unique(index.shard_ids[sel]).tolist():
        part = sel[index.shard_ids[sel] == shard]
        runs = coalesce(
            index.offsets[part], index.lengths[part], max_gap=max_gap, max_block=1 << 24
        )
        first, last = runs.start // 4096, (runs.stop + 4095) // 4096
        pages = np.unique(
            np.concatenate([np.arange(a, b) for a, b in zip(first, last, strict=True)])
        )
        total += int(pages.size) * 4096
    return total


def run_ours(
    index: PruneIndex,
    cfg: PruneConfig,
    max_gap: int,
    verify: bool = True,
    *,
    readahead: str = "planned",
) -> list[str]:
    from rsprune_data import PrunedWebDataset
    from rsprune_data.reading import ReadOptions

    ds = PrunedWebDataset(
        index,
        cfg,
        shuffle_shards=False,
        max_gap=max_gap,
        verify=verify,
        sample_window=0,
        read=ReadOptions(readahead=readahead),
    )
    return [s["__key__"] for s in ds]


def run_map(index: PruneIndex, cfg: PruneConfig, verify: bool) -> list[str]:
    """The map-style dataset in this process, in selection order (no DataLoader)."""
    from rsprune_data import PrunedShardDataset

    ds = PrunedShardDataset(index, verify=verify)
    return [ds[i]["__key__"] for i in index.select(cfg).tolist()]


def run_order(index: PruneIndex, cfg: PruneConfig, window: int) -> list[str]:
    from rsprune_data import PrunedWebDataset

    ds = PrunedWebDataset(index, cfg, shuffle_shards=True, sample_window=window, seed=1)
    ds.set_epoch(1)
    return [s["__key__"] for s in ds]


def measure_order(
    index: PruneIndex,
    shards: list[str],
    keys: list[str],
    ratio: float,
    windows: list[int],
    repeat: int,
    dropped: bool,
) -> dict[str, Any]:
    """Sample-level order (``sample_window=w``) against shard order (``0``), warm and cold.

    The sides alternate within every repetition (shard order, then each window), so a load spike
    on the shared machine hits both; each side reports its best run and its spread.
    """
    del dropped  # never drop the whole machine's cache here: evict just the shards (fadvise)
    total = sum(os.path.getsize(s) for s in shards)
    cfg = PruneConfig(prune_ratio=ratio, entropy_filter="none")
    want = {keys[i] for i in index.select(cfg).tolist()}
    row: dict[str, Any] = {
        "prune_ratio": ratio,
        "selected": len(want),
        "cold_method": "sync + posix_fadvise(DONTNEED) per shard before each run",
        "order": "sides alternate within each repetition; best and spread",
    }
    sides = [0, *windows]
    for cache, before in (
        ("warm", partial(warm, shards)),
        ("cold", partial(evict, shards, drop_caches=False)),
    ):
        runs: dict[int, list[dict[str, Any]]] = {w: [] for w in sides}
        for _ in range(repeat):
            for w in sides:
                before()
                r = timed(partial(run_order, index, cfg, w))
                if set(r.pop("keys")) != want:
                    raise SystemExit(
                        f"sample_window={w} delivered other samples than the selection"
                    )
                runs[w].append(r)
        for w in sides:
            secs = [r["seconds"] for r in runs[w]]
            best = min(runs[w], key=lambda r: r["seconds"])
            out = {
                **best,
                "samples_per_s": len(want) / best["seconds"],
                "spread": [min(secs), max(secs)],
            }
            name = (
                "shard order (sample_window=0)" if w == 0 else f"sample order (sample_window={w})"
            )
            line = (
                f"  {cache:4} {name}: best {out['seconds']:.3f} s [{min(secs):.3f}-"
                f"{max(secs):.3f}], {out['samples_per_s']:.0f} samples/s, read "
                f"{out['rchar'] / total:.3f}x of shards"
            )
            if w:
                out["vs_shard_order"] = row[f"shard_order_{cache}"]["seconds"] / best["seconds"]
                line += f": {out['vs_shard_order']:.2f}x the shard order's speed"
                row[f"sample_order_w{w}_{cache}"] = out
            else:
                row[f"shard_order_{cache}"] = out
            print(line)
    return row


def run_stream(shards: list[str], keep: set[str]) -> list[str]:
    import webdataset as wds

    ds = wds.WebDataset(shards, shardshuffle=False).select(lambda s: s["__key__"] in keep)
    return [s["__key__"] for s in ds]


def _keys(batch: list[dict[str, Any]]) -> list[str]:
    return [s["__key__"] for s in batch]


def run_sampler(index: PruneIndex, cfg: PruneConfig, workers: int) -> list[str]:
    from torch.utils.data import DataLoader

    from rsprune_data import PrunedShardDataset

    loader: DataLoader[Any] = DataLoader(
        PrunedShardDataset(index),
        sampler=PrunedSampler(index, cfg, shuffle=False),
        batch_size=64,
        num_workers=workers,
        collate_fn=_keys,
    )
    return [k for batch in loader for k in batch]


def run_ours_loader(index: PruneIndex, cfg: PruneConfig, workers: int) -> list[str]:
    from torch.utils.data import DataLoader

    from rsprune_data import PrunedWebDataset

    ds = PrunedWebDataset(index, cfg, shuffle_shards=False, sample_window=0)
    loader: DataLoader[Any] = DataLoader(ds, batch_size=64, num_workers=workers, collate_fn=_keys)
    return [k for batch in loader for k in batch]


def best_run(fn: Callable[[], list[str]], repeat: int, want: set[str]) -> dict[str, float]:
    """Best and worst of ``repeat`` warm runs (for a small difference: verification cost)."""
    times = []
    for _ in range(repeat):
        r = timed(fn)
        if set(r["keys"]) != want:
            raise SystemExit(f"{fn} delivered other samples than the selection")
        times.append(r["seconds"])
    return {"best": min(times), "worst": max(times)}


def median_run(
    fn: Callable[[], list[str]], repeat: int, before: Callable[[], None], want: set[str]
) -> dict[str, Any]:
    runs = []
    for _ in range(repeat):
        before()
        r = timed(fn)
        if set(r.pop("keys")) != want:
            raise SystemExit(f"{fn} delivered other samples than the selection")
        r["samples_per_s"] = len(want) / r["seconds"]
        runs.append(r)
    out = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    out["best_seconds"] = min(r["seconds"] for r in runs)  # for ratios against best-of peers
    return out


def measure_ratio(
    index: PruneIndex,
    shards: list[str],
    keys: list[str],
    ratio: float,
    gaps: list[int],
    repeat: int,
    workers: int,
    dropped: bool,
    verify_only: bool = False,
) -> dict[str, Any]:
    """Every measurement of one prune ratio (same samples on every path, checked)."""
    total_bytes = sum(os.path.getsize(s) for s in shards)
    cfg = PruneConfig(prune_ratio=ratio, entropy_filter="none")
    sel = index.select(cfg)
    want = {keys[i] for i in sel.tolist()}
    row: dict[str, Any] = {"prune_ratio": ratio, "selected": len(sel)}
    warm_all = partial(warm, shards)
    if verify_only:
        return _measure_verify(row, index, cfg, repeat, want, warm_all)
    for cache, before in (
        ("warm", warm_all),
        ("cold", partial(evict, shards, drop_caches=dropped)),
    ):
        stream = median_run(partial(run_stream, shards, want), repeat, before, want)
        row[f"stream_{cache}"] = stream
        for gap in gaps:
            ours = median_run(partial(run_ours, index, cfg, gap), repeat, before, want)
            ours["speedup"] = stream["seconds"] / ours["seconds"]
            ours["bytes_fraction"] = ours["rchar"] / total_bytes
            row[f"ours_{cache}_gap{gap}"] = ours
        # O_DIRECT: exactly the bytes asked from the device, past the page cache (reading.local)
        ours = median_run(
            partial(run_ours, index, cfg, DEFAULT_LOCAL_MAX_GAP, readahead="direct"),
            repeat,
            before,
            want,
        )
        ours["speedup"] = stream["seconds"] / ours["seconds"]
        ours["bytes_fraction"] = ours["rchar"] / total_bytes
        row[f"ours_{cache}_direct"] = ours
    row["page_floor_bytes"] = page_floor(index, cfg, DEFAULT_LOCAL_MAX_GAP)
    for name, fn in (("sampler_loader_warm", run_sampler), ("ours_loader_warm", run_ours_loader)):
        row[name] = median_run(partial(fn, index, cfg, workers), repeat, warm_all, want)
        row[name]["vs_stream"] = row["stream_warm"]["seconds"] / row[name]["seconds"]
    return _measure_verify(row, index, cfg, repeat, want, warm_all)


def _measure_verify(
    row: dict[str, Any],
    index: PruneIndex,
    cfg: PruneConfig,
    repeat: int,
    want: set[str],
    warm_all: Callable[[], None],
) -> dict[str, Any]:
    from rsprune_data.wds import DEFAULT_MAX_GAP

    warm_all()
    for name, fn in (
        ("stream_ours", partial(run_ours, index, cfg, DEFAULT_MAX_GAP)),
        ("map_style", partial(run_map, index, cfg)),
    ):
        # interleaved, best of N each: the verify/no-verify ratio is what matters here
        on, off = [], []
        for _ in range(max(repeat, 3)):
            on.append(best_run(partial(fn, True), 1, want)["best"])
            off.append(best_run(partial(fn, False), 1, want)["best"])
        row[f"verify_{name}"] = {
            "verify_best": min(on),
            "verify_worst": max(on),
            "no_verify_best": min(off),
            "no_verify_worst": max(off),
            "cost_ratio": min(on) / min(off),
        }
    row["map_style_warm"] = median_run(partial(run_map_style, index, cfg), repeat, warm_all, want)
    if "stream_warm" in row:  # not measured with --verify-only
        row["map_style_warm"]["vs_stream"] = (
            row["stream_warm"]["seconds"] / row["map_style_warm"]["seconds"]
        )
    return row


# --- peers: the same subset served by other libraries (optional `bench` extra) ---


def _subset(shards: list[str], want: set[str]) -> list[dict[str, Any]]:
    import webdataset as wds

    return [s for s in wds.WebDataset(shards, shardshuffle=False) if s["__key__"] in want]


def _mds_peer(
    samples: list[dict[str, Any]], out: Path
) -> tuple[dict[str, Any], Callable[[], list[str]]]:
    from streaming import MDSWriter, StreamingDataset

    t0 = time.perf_counter()
    cols = {"key": "str", "jpeg": "bytes", "cls": "bytes"}
    with MDSWriter(out=str(out), columns=cols, size_limit="64mb") as w:
        for s in samples:
            w.write({"key": s["__key__"], "jpeg": s.get("jpeg", b""), "cls": s.get("cls.txt", b"")})
    rewrite = time.perf_counter() - t0

    def run() -> list[str]:
        ds = StreamingDataset(local=str(out), shuffle=False, batch_size=1)
        return [s["key"] for s in ds]

    return {"rewrite_seconds": rewrite}, run


def _litdata_item(s: dict[str, Any]) -> dict[str, Any]:
    return {"key": s["__key__"], "jpeg": s.get("jpeg", b""), "cls": s.get("cls.txt", b"")}


def _litdata_peer(
    samples: list[dict[str, Any]], out: Path
) -> tuple[dict[str, Any], Callable[[], list[str]]]:
    import litdata

    t0 = time.perf_counter()
    litdata.optimize(
        fn=_litdata_item,
        inputs=samples,
        output_dir=str(out),
        chunk_bytes="64MB",
        num_workers=1,
        mode="overwrite",
    )
    rewrite = time.perf_counter() - t0

    def run() -> list[str]:
        ds = litdata.StreamingDataset(str(out))
        return [s["key"] for s in ds]

    made = litdata.StreamingDataset(str(out))

    def epoch() -> list[str]:  # an epoch of a dataset built once, as a training loop runs it
        return [s["key"] for s in made]

    return {"rewrite_seconds": rewrite, "_epoch": epoch}, run


def _raw_crude_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """Energon cooker that hands the crude webdataset dict (raw bytes per part) back unchanged."""
    return sample


def _energon_peer(
    shards: list[str], samples: list[dict[str, Any]], out: Path
) -> tuple[dict[str, Any], Callable[[], list[str]]]:
    """Megatron-Energon over the original shards, the subset given as a sample exclude list.

    ``out`` gets symlinks to the shards, so Energon's metadata (``.nv-meta/`` and a ``.tar.idx``
    per shard) is written there and not into the benchmark's shard cache. Two costs:

    * ``prepare_seconds``: ``energon prepare`` of the shards (Python API:
      ``WebdatasetPreparator.prepare_dataset``, one split part ``train`` holding every shard, no
      shard shuffle, plus the ``dataset.yaml`` that ``energon prepare --sample-type
      CrudeWebdataset`` writes): once per shard set, shared by every subset;
    * ``rewrite_seconds``: per subset, a split config ``.nv-meta/split-subset.json`` with the same
      split part and ``exclude: ["<shard>/<key>", ...]`` for every sample not in the subset
      (Energon compares ``f"{shard name}/{__key__}"`` with that set in
      ``BaseWebdatasetFactory.sample_filter``). The keys of all samples come from Energon's own
      ``index.sqlite``, written by the prepare step. No sample bytes are rewritten.

    Iteration: ``get_val_dataset`` (no shuffle, one pass, no repeat) with a ``CrudeWebdataset``
    and a task encoder whose only cooker returns the crude dict, ``decoder = None`` (nothing
    decoded), ``batch_size=None`` (one sample per step), ``WorkerConfig(rank=0, world_size=1,
    num_workers=0)`` through ``get_loader`` with its defaults (``gc.collect()`` every 10 steps, a
    watchdog), all in this process. Energon's ``__key__`` is the
    webdataset key (``split_name_re``: the member name up to the first dot of its base name),
    the same as ours, so no mapping is needed. An excluded sample is still visited: its
    ``.tar.idx`` entry is looked up, its first tar header read, then it is dropped.
    """
    import sqlite3
    import warnings

    from megatron.energon import (
        Cooker,
        DefaultTaskEncoder,
        WorkerConfig,
        get_loader,
        get_val_dataset,
        stateless,
    )
    from megatron.energon.flavors.webdataset.prepare import WebdatasetPreparator

    names = [os.path.basename(s) for s in shards]
    if len(set(names)) != len(names):
        raise RuntimeError("shard file names are not unique: cannot link them into one folder")
    out.mkdir(parents=True)
    for shard, name in zip(shards, names, strict=True):
        (out / name).symlink_to(os.path.abspath(shard))
    t0 = time.perf_counter()
    WebdatasetPreparator.prepare_dataset(
        out,
        names,
        split_parts_patterns=[("train", ".*")],
        shuffle_seed=None,
        workers=min(4, os.cpu_count() or 1),
    )
    # what `energon prepare --non-interactive --sample-type CrudeWebdataset` writes
    (out / ".nv-meta" / "dataset.yaml").write_text(
        "__module__: megatron.energon\n__class__: CrudeWebdataset\n"
    )
    prepare_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    keep = {s["__key__"] for s in samples}
    with sqlite3.connect(out / ".nv-meta" / "index.sqlite") as db:
        # tar_file_id is the position of the shard in the list given to prepare_dataset
        rows = db.execute("SELECT tar_file_id, sample_key FROM samples").fetchall()
    exclude = [f"{names[tar]}/{key}" for tar, key in rows if key not in keep]
    if any(c in e for e in exclude for c in "{}"):
        raise RuntimeError("a sample key holds a brace: Energon brace-expands exclude entries")
    split = {"split_parts": {"train": names}, "exclude": exclude}
    (out / ".nv-meta" / "split-subset.json").write_text(json.dumps(split))
    subset_s = time.perf_counter() - t0

    class RawEncoder(DefaultTaskEncoder):  # type: ignore[misc]
        cookers = (Cooker(stateless(_raw_crude_sample)),)
        decoder = None

    def run() -> list[str]:
        ds = get_val_dataset(
            out,
            split_part="train",
            split_config="split-subset.json",
            worker_config=WorkerConfig(rank=0, world_size=1, num_workers=0),
            batch_size=None,
            task_encoder=RawEncoder(),
        )
        with warnings.catch_warnings():  # DataLoader(pin_memory=True) without an accelerator
            warnings.filterwarnings("ignore", message=".*pin_memory.*")
            return [s["__key__"] for s in get_loader(ds)]

    costs = {
        "prepare_seconds": prepare_s,
        "rewrite_seconds": subset_s,
        "setup": "energon prepare of the original shards (once), per subset a split config "
        f"with a {len(exclude)}-sample exclude list; no sample bytes rewritten",
    }
    return costs, run


def _epochs(
    peer: Callable[[], list[str]], ours: Callable[[], list[str]], repeat: int, want: set[str]
) -> dict[str, Any]:
    """Epochs of datasets built once (what a training loop pays per epoch), interleaved."""
    theirs, mine = [], []
    for _ in range(repeat):
        for side, fn in ((theirs, peer), (mine, ours)):
            t0 = time.perf_counter()
            got = fn()
            side.append(time.perf_counter() - t0)
            if set(got) != want or len(got) != len(want):
                raise RuntimeError("an epoch delivered other samples than the selection")
    return {
        "epoch_seconds": min(theirs),
        "ours_epoch_seconds": min(mine),
        "ours_over_peer_epoch": min(mine) / min(theirs),
    }


def ours_epochs(index: PruneIndex, cfg: PruneConfig) -> Callable[[], list[str]]:
    """Successive epochs of one ``PrunedWebDataset`` (``set_epoch`` each time), as ``run_ours``
    reads them (shard order, default ``max_gap``)."""
    from rsprune_data import PrunedWebDataset

    ds = PrunedWebDataset(index, cfg, shuffle_shards=False, sample_window=0)
    count = iter(range(1 << 30))

    def epoch() -> list[str]:
        ds.set_epoch(next(count))
        return [s["__key__"] for s in ds]

    return epoch


def peers_of(
    index: PruneIndex,
    cfg: PruneConfig,
    shards: list[str],
    want: set[str],
    args: argparse.Namespace,
    ratio: float,
) -> dict[str, Any]:
    """:func:`measure_peers` against ``PrunedWebDataset`` built per run and built once."""
    from rsprune_data.wds import DEFAULT_MAX_GAP

    return measure_peers(
        shards,
        want,
        args.repeat,
        args.cache,
        ratio,
        partial(run_ours, index, cfg, DEFAULT_MAX_GAP),
        ours_epochs(index, cfg),
    )


def measure_peers(
    shards: list[str],
    want: set[str],
    repeat: int,
    workdir: Path,
    ratio: float,
    ours: Callable[[], list[str]],
    ours_epoch: Callable[[], list[str]] | None = None,
) -> dict[str, Any]:
    """Each installed peer serving the subset: rewrite (or, Energon, exclude-list) seconds, then
    best-of ``repeat`` iteration of raw samples in one process (page cache warm), each peer run
    interleaved with a run of ``ours`` (``PrunedWebDataset``), so that both sides of the ratio
    are timed in the same minutes (this VM's speed drifts by tens of percent from minute to
    minute). Missing peers are reported as skipped with the reason."""
    import shutil

    samples = _subset(shards, want)
    total = sum(os.path.getsize(s) for s in shards)
    out: dict[str, Any] = {}
    peers: tuple[
        tuple[
            str,
            Callable[[list[dict[str, Any]], Path], tuple[dict[str, Any], Callable[[], list[str]]]],
        ],
        ...,
    ] = (
        ("mosaicml-streaming", _mds_peer),
        ("litdata", _litdata_peer),
        ("megatron-energon", partial(_energon_peer, shards)),
    )
    for name, make in peers:
        folder = workdir / f"{name}-{ratio}"
        shutil.rmtree(folder, ignore_errors=True)
        try:
            costs, run = make(samples, folder)
            runs, mine = [], []
            for _ in range(repeat):
                runs.append(timed(run))
                keys = runs[-1].pop("keys")
                if set(keys) != want or len(keys) != len(want):
                    raise RuntimeError("delivered other samples than the selection")
                t0 = time.perf_counter()
                got = ours()
                mine.append(time.perf_counter() - t0)
                if set(got) != want:
                    raise SystemExit("PrunedWebDataset delivered other samples than the selection")
            times = [r["seconds"] for r in runs]
            best = min(runs, key=lambda r: r["seconds"])
            epoch = costs.pop("_epoch", None)
            if epoch is not None and ours_epoch is not None:
                costs.update(_epochs(epoch, ours_epoch, repeat, want))
            out[name] = {
                **costs,
                "seconds": best["seconds"],
                "spread": max(times) - min(times),
                "samples_per_s": len(want) / best["seconds"],
                "rchar": best["rchar"],
                "bytes_fraction": best["rchar"] / total,
                "ours_seconds": min(mine),
                "ours_spread": max(mine) - min(mine),
                "ours_over_peer": min(mine) / best["seconds"],
            }
        except Exception as exc:  # optional peers: any failure is reported, never fatal
            out[name] = {"skipped": f"{type(exc).__name__}: {exc}"[:300]}
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return out


def run_map_style(index: PruneIndex, cfg: PruneConfig) -> list[str]:
    """PrunedShardDataset + PrunedSampler in this process: batches go through __getitems__."""
    from torch.utils.data import DataLoader

    from rsprune_data import PrunedShardDataset

    loader: DataLoader[Any] = DataLoader(
        PrunedShardDataset(index),
        sampler=PrunedSampler(index, cfg, shuffle=False),
        batch_size=256,
        num_workers=0,
        collate_fn=_keys,
    )
    return [k for batch in loader for k in batch]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--src", type=Path, default=Path("/work/shared/data/harvey"))
    ap.add_argument("--cache", type=Path, default=Path("/tmp/rsprune_bench"))
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.7, 0.85, 0.9])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--gaps",
        type=int,
        nargs="+",
        default=[0, 4096, 65536],
        help="max_gap values for PrunedWebDataset (its default is always added)",
    )
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--sample-windows",
        type=int,
        nargs="+",
        default=[8],
        help="sample_window values compared with shard order (0)",
    )
    ap.add_argument(
        "--order-only",
        action="store_true",
        help="measure only the sample-level order against shard order",
    )
    ap.add_argument(
        "--peers",
        action="store_true",
        help="also measure MosaicML streaming and litdata over per-ratio rewrites, and "
        "Megatron-Energon over the original shards with a per-ratio exclude list",
    )
    ap.add_argument(
        "--peers-only",
        action="store_true",
        help="only the peers (implies --peers), against PrunedWebDataset warm at the default "
        "max_gap",
    )
    ap.add_argument("--out", type=Path, default=Path("results/streaming_io.json"))
    ap.add_argument(
        "--read-block",
        type=int,
        default=0,
        help="items per read block of PrunedWebDataset (default: the library's, 1024)",
    )
    ap.add_argument(
        "--verify-only",
        action="store_true",
        help="only the cost of checksum verification (verify vs verify=False)",
    )
    args = ap.parse_args()

    from rsprune_data import wds as wds_module
    from rsprune_data.wds import DEFAULT_MAX_GAP

    if args.read_block:  # the loader's private block size, to measure its choice
        wds_module._READ_BLOCK = args.read_block

    shards = prepare(args.src, args.cache, args.shard_size)
    total_bytes = sum(os.path.getsize(s) for s in shards)
    t0 = time.perf_counter()
    index = PruneIndex.load(shards)
    load_s = time.perf_counter() - t0
    keys = list(index.keys)
    gaps = sorted(set(args.gaps) | {DEFAULT_MAX_GAP})
    dropped = drop_caches_allowed()
    cold = "sync + drop_caches" if dropped else "sync + posix_fadvise(DONTNEED) per shard"
    print(
        f"{len(shards)} shards, {len(index)} samples, {total_bytes / 1e6:.1f} MB; index load "
        f"{load_s:.3f} s; /proc/sys/vm/drop_caches "
        f"{'allowed' if dropped else 'not allowed here'}; cold cache = {cold}"
    )
    results = []
    order = []
    for ratio in args.ratios:
        cfg = PruneConfig(prune_ratio=ratio, entropy_filter="none")
        if args.peers_only:
            want = {keys[i] for i in index.select(cfg).tolist()}
            row: dict[str, Any] = {"prune_ratio": ratio, "selected": len(want)}
            row[f"ours_warm_gap{DEFAULT_MAX_GAP}"] = median_run(
                partial(run_ours, index, cfg, DEFAULT_MAX_GAP),
                args.repeat,
                partial(warm, shards),
                want,
            )
            row["peers"] = peers_of(index, cfg, shards, want, args, ratio)
            results.append(row)
            _print_row(row, gaps, DEFAULT_MAX_GAP, total_bytes, args.workers)
            continue
        print(
            f"\nprune_ratio {ratio}: sample-level order against shard order (shuffled shards; "
            "cold = posix_fadvise(DONTNEED) per shard)"
        )
        order.append(
            measure_order(index, shards, keys, ratio, args.sample_windows, args.repeat, dropped)
        )
        if args.order_only:
            continue
        results.append(
            measure_ratio(
                index,
                shards,
                keys,
                ratio,
                gaps,
                args.repeat,
                args.workers,
                dropped,
                args.verify_only,
            )
        )
        if args.peers:
            want = {keys[i] for i in index.select(cfg).tolist()}
            results[-1]["peers"] = peers_of(index, cfg, shards, want, args, ratio)
        _print_row(results[-1], gaps, DEFAULT_MAX_GAP, total_bytes, args.workers)
    report = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "shards": len(shards),
        "samples": len(index),
        "shard_bytes": total_bytes,
        "index_load_seconds": load_s,
        "drop_caches_allowed": dropped,
        "cold_method": cold + " before each run",
        "default_max_gap": DEFAULT_MAX_GAP,
        "workers": args.workers,
        "results": results,
        "sample_order": order,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    if not results or args.verify_only or args.peers_only:
        print(f"wrote {args.out}")
        return
    plot(report, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


def _print_row(
    row: dict[str, Any], gaps: list[int], default_gap: int, total: int, workers: int
) -> None:
    n = row["selected"]
    print(f"\nprune_ratio {row['prune_ratio']}: {n} samples selected")
    for cache in ("warm", "cold") if "stream_warm" in row else ():
        s = row[f"stream_{cache}"]
        print(
            f"  {cache:4} stream           {s['seconds']:7.3f} s {n / s['seconds']:9.0f} "
            f"samples/s  read {s['rchar'] / total:5.3f}x of shards "
            f"(device {s['read_bytes'] / total:5.3f}x)"
        )
        for gap in gaps:
            o = row[f"ours_{cache}_gap{gap}"]
            mark = " (default)" if gap == default_gap else ""
            print(
                f"  {cache:4} ours max_gap={gap:<6d}{o['seconds']:7.3f} s {n / o['seconds']:9.0f} "
                f"samples/s  read {o['bytes_fraction']:5.3f}x (device "
                f"{o['read_bytes'] / total:5.3f}x)  {o['speedup']:6.1f}x faster{mark}"
            )
        if cache == "cold" and "page_floor_bytes" in row:
            print(
                f"  cold page floor (4 KiB pages of the runs, max_gap={default_gap}): "
                f"{row['page_floor_bytes'] / total:5.3f}x of the shards"
            )
        o = row.get(f"ours_{cache}_direct")
        if o is not None:
            print(
                f"  {cache:4} ours readahead=direct {o['seconds']:7.3f} s "
                f"{n / o['seconds']:9.0f} samples/s  read {o['bytes_fraction']:5.3f}x (device "
                f"{o['read_bytes'] / total:5.3f}x)  {o['speedup']:6.1f}x faster (O_DIRECT)"
            )
    for name in ("sampler_loader_warm", "ours_loader_warm", "map_style_warm"):
        if name not in row or "stream_warm" not in row:
            continue
        r = row[name]
        s = row["stream_warm"]["seconds"]
        who = "0 workers, __getitems__" if name == "map_style_warm" else f"{workers} workers"
        print(
            f"  warm {name} ({who}): {r['seconds']:7.3f} s "
            f"{n / r['seconds']:9.0f} samples/s, {s / r['seconds']:6.1f}x the stream"
        )
    for name in ("stream_ours", "map_style"):
        if f"verify_{name}" not in row:  # --peers-only
            continue
        v = row[f"verify_{name}"]
        print(
            f"  warm checksum verification, {name:11s}: verify {v['verify_best']:.3f} s "
            f"(worst {v['verify_worst']:.3f}), verify=False {v['no_verify_best']:.3f} s (worst "
            f"{v['no_verify_worst']:.3f}): cost {100 * (v['cost_ratio'] - 1):+.1f}% "
            f"(ratio {v['cost_ratio']:.3f})"
        )
    mine = row.get(f"ours_warm_gap{default_gap}", {})
    ours = mine.get("best_seconds", mine.get("seconds", 0.0))  # best of N on both sides
    for name, r in row.get("peers", {}).items():
        if "skipped" in r:
            print(f"  warm peer {name}: skipped ({r['skipped']})")
        else:
            cost = (
                f"a {r['prepare_seconds']:.2f} s energon prepare (once per shard set) and a "
                f"{r['rewrite_seconds']:.2f} s exclude list"
                if "prepare_seconds" in r
                else f"a {r['rewrite_seconds']:.2f} s rewrite"
            )
            print(
                f"  warm peer {name}: {r['seconds']:7.3f} s (±{r['spread']:.3f}) "
                f"{n / r['seconds']:9.0f} samples/s, read {r['bytes_fraction']:5.3f}x of the "
                f"shards, after {cost}; PrunedWebDataset / peer time "
                f"{r.get('ours_over_peer', ours / r['seconds']):.2f} (best of each, interleaved: "
                f"ours {r.get('ours_seconds', ours):.4f} s ±{r.get('ours_spread', 0.0):.4f})"
            )
            if "epoch_seconds" in r:
                print(
                    f"    per epoch of datasets built once: peer {r['epoch_seconds']:.4f} s "
                    f"({n / r['epoch_seconds']:.0f}/s), PrunedWebDataset "
                    f"{r['ours_epoch_seconds']:.4f} s ({n / r['ours_epoch_seconds']:.0f}/s): "
                    f"ours / peer {r['ours_over_peer_epoch']:.2f} (best of each, interleaved)"
                )


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    ratios = [r["prune_ratio"] for r in rows]
    gap = report["default_max_gap"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for cache, style in (("warm", "-o"), ("cold", "--s")):
        ax1.plot(
            ratios,
            [r[f"ours_{cache}_gap{gap}"]["speedup"] for r in rows],
            style,
            label=f"PrunedWebDataset, {cache}",
        )
        ax2.plot(
            ratios,
            [r[f"ours_{cache}_gap{gap}"]["bytes_fraction"] for r in rows],
            style,
            label=f"PrunedWebDataset, {cache}",
        )
    ax2.plot(
        ratios,
        [r[f"ours_cold_gap{gap}"]["read_bytes"] / report["shard_bytes"] for r in rows],
        "-.^",
        label="PrunedWebDataset, cold, from the device (readahead)",
    )
    ax2.plot(
        ratios,
        [r["stream_warm"]["rchar"] / report["shard_bytes"] for r in rows],
        ":",
        label="wds.WebDataset.select",
    )
    ax2.plot(ratios, [1 - x for x in ratios], color="grey", lw=0.8, label="kept share")
    ax1.set(
        xlabel="prune ratio",
        ylabel="speed-up over wds.WebDataset(...).select",
        title="wall time to deliver the selection",
    )
    ax2.set(xlabel="prune ratio", ylabel="bytes read / shard bytes", title="bytes read")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"{report['shards']} shards, {report['samples']} samples, max_gap={gap} B", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
