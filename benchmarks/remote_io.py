"""Remote shards over HTTP: PrunedWebDataset by byte range vs webdataset's stream + select.

    python benchmarks/remote_io.py [--src /work/shared/data/harvey] [--cache /tmp/rsprune_bench]
        [--ratios 0.5 0.7 0.85 0.9] [--repeat 3] [--rate 20m] [--delay 0 0.01]
        [--gaps 0 4096 16384 65536] [--out results/remote_io.json]

The same 22 Harvey shards as ``benchmarks/streaming_io.py`` are served by a real ``nginx`` on
127.0.0.1 (``tests/servers.py``) with a per-connection ``limit_rate`` (``--rate``, nginx syntax);
``--delay`` adds a fixed latency per request with ``tests/servers.LatencyProxy``, an asyncio TCP
relay in front of nginx that holds each chunk of the answers ``delay`` seconds (``tc netem`` is
not in this machine's kernel; the relay's CPU cost, small, is part of what is measured on both
sides; ``--proxy http`` uses the heavier threaded HTTP proxy of the fault tests instead). One process, raw samples, nothing decoded:

* ``ours``: ``PrunedWebDataset(urls, config, index_dir=..., shuffle_shards=False)``, fsspec range
  requests, ``concurrency`` in flight, runs merged up to ``remote_max_gap`` (each of ``--gaps``);
* ``stream``: ``wds.WebDataset(urls, shardshuffle=False).select(lambda s: s["__key__"] in keep)``
  (webdataset opens URLs with ``curl``): every byte is transferred, most samples dropped.

Both deliver exactly the same keys (checked). Bytes transferred are the body bytes nginx logged
(``$body_bytes_sent``). Times are best of ``--repeat`` with the spread (max - min) beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from servers import FaultyProxy, LatencyProxy, Nginx
from streaming_io import prepare

from rsprune_data import PruneConfig, PrunedWebDataset, PruneIndex
from rsprune_data.reading import DEFAULT_CONCURRENCY, DEFAULT_REMOTE_MAX_GAP, ReadOptions


def body_bytes(server: Nginx) -> int:
    return sum(int(line.split()[2]) for line in server.access_log.read_text().splitlines())


def best_of(
    fn: Callable[[], list[str]], repeat: int, server: Nginx, want: set[str]
) -> dict[str, Any]:
    times, sent = [], []
    for _ in range(repeat):
        server.reset_log()
        t0 = time.perf_counter()
        keys = fn()
        times.append(time.perf_counter() - t0)
        time.sleep(0.05)  # nginx writes the log line when the response is done
        sent.append(body_bytes(server))
        if len(keys) != len(want) or set(keys) != want:
            raise SystemExit(f"{fn} delivered other samples than the selection")
    return {
        "seconds": min(times),
        "spread": max(times) - min(times),
        "bytes": min(sent),
        "samples_per_s": len(want) / min(times),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--src", type=Path, default=Path("/work/shared/data/harvey"))
    ap.add_argument("--cache", type=Path, default=Path("/tmp/rsprune_bench"))
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.7, 0.85, 0.9])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rate", default="20m", help="nginx limit_rate per connection ('' = none)")
    ap.add_argument(
        "--delay",
        type=float,
        nargs="+",
        default=[0.0],
        help="seconds of latency added per request (0 = nginx directly)",
    )
    ap.add_argument("--gaps", type=int, nargs="+", default=[0, 4096, 16384, 65536])
    ap.add_argument(
        "--concurrency",
        type=int,
        default=DEFAULT_CONCURRENCY,
        help=f"ranges in flight (default: the library's, {DEFAULT_CONCURRENCY})",
    )
    ap.add_argument(
        "--proxy",
        choices=["tcp", "http"],
        default="tcp",
        help="latency by the asyncio TCP relay (default) or the threaded HTTP proxy",
    )
    ap.add_argument("--out", type=Path, default=Path("results/remote_io.json"))
    args = ap.parse_args()

    shards = prepare(args.src, args.cache, args.shard_size)
    shard_dir = Path(shards[0]).parent
    total = sum(os.path.getsize(s) for s in shards)
    index = PruneIndex.load(shards)
    keys = list(index.keys)
    gaps = sorted(set(args.gaps) | {DEFAULT_REMOTE_MAX_GAP})
    print(
        f"{len(shards)} shards, {len(index)} samples, {total / 1e6:.1f} MB; nginx limit_rate "
        f"{args.rate or 'none'} per connection; {os.cpu_count()} CPUs, shared machine"
    )
    results = []
    with Nginx(shard_dir, args.cache / "nginx", limit_rate=args.rate or None) as server:
        for delay in args.delay:
            upstream = f"127.0.0.1:{server.port}"
            proxy: Any = None
            if delay:
                proxy = (
                    LatencyProxy(upstream, delay)
                    if args.proxy == "tcp"
                    else FaultyProxy(upstream, delay=delay)
                )
            if proxy is not None:
                proxy.__enter__()
            base = proxy.url if proxy is not None else server.url
            urls = [f"{base}/{Path(s).name}" for s in shards]
            try:
                for ratio in args.ratios:
                    row = measure(urls, shard_dir, index, keys, ratio, gaps, args, server)
                    row["delay"] = delay
                    results.append(row)
                    print_row(row, gaps, total)
            finally:
                if proxy is not None:
                    proxy.__exit__(None, None, None)
    report = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "note": "shared 2-core machine",
        },
        "shards": len(shards),
        "samples": len(index),
        "shard_bytes": total,
        "rate": args.rate,
        "default_remote_max_gap": DEFAULT_REMOTE_MAX_GAP,
        "concurrency": args.concurrency,
        "latency_by": args.proxy,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


def measure(
    urls: list[str],
    index_dir: Path,
    index: PruneIndex,
    keys: list[str],
    ratio: float,
    gaps: list[int],
    args: argparse.Namespace,
    server: Nginx,
) -> dict[str, Any]:
    import webdataset as wds

    cfg = PruneConfig(prune_ratio=ratio, entropy_filter="none")
    sel = index.select(cfg)
    want = {keys[i] for i in sel.tolist()}
    row: dict[str, Any] = {
        "prune_ratio": ratio,
        "selected": len(sel),
        "selected_bytes": int(index.lengths[sel].sum()),
    }

    def stream() -> list[str]:
        ds = wds.WebDataset(urls, shardshuffle=False).select(lambda s: s["__key__"] in want)
        return [s["__key__"] for s in ds]

    row["stream"] = best_of(stream, args.repeat, server, want)
    for gap in gaps:
        opts = ReadOptions(remote_max_gap=gap, concurrency=args.concurrency)

        def ours(opts: ReadOptions = opts) -> list[str]:
            ds = PrunedWebDataset(
                urls, cfg, index_dir=str(index_dir), shuffle_shards=False, read=opts
            )
            return [s["__key__"] for s in ds]

        r = best_of(ours, args.repeat, server, want)
        r["speedup"] = row["stream"]["seconds"] / r["seconds"]
        row[f"ours_gap{gap}"] = r
    return row


def print_row(row: dict[str, Any], gaps: list[int], total: int) -> None:
    s = row["stream"]
    print(
        f"\ndelay {row['delay'] * 1e3:.0f} ms, prune_ratio {row['prune_ratio']}: "
        f"{row['selected']} samples ({row['selected_bytes'] / total:.3f}x of the shard bytes)"
    )
    print(
        f"  stream + select      {s['seconds']:7.3f} s (±{s['spread']:.3f}) "
        f"{s['samples_per_s']:8.0f} samples/s  transferred {s['bytes'] / total:5.3f}x"
    )
    for gap in gaps:
        o = row[f"ours_gap{gap}"]
        mark = " (default)" if gap == DEFAULT_REMOTE_MAX_GAP else ""
        print(
            f"  ours gap={gap:<6d}       {o['seconds']:7.3f} s (±{o['spread']:.3f}) "
            f"{o['samples_per_s']:8.0f} samples/s  transferred {o['bytes'] / total:5.3f}x  "
            f"{o['speedup']:5.1f}x faster{mark}"
        )


if __name__ == "__main__":
    main()
