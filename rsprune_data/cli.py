"""`rsprune-data`: pack folders into shards, build centroids, index, reassign, select, report, demo.

Exit status: 0 success; 1 the job ran but something failed (a shard could not be indexed, a disk
filled up); 2 bad arguments or input (the message says what to change). Output paths are checked
before any work starts.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from ._fsio import atomic_write_text
from ._validate import check_output_dir, check_output_file, check_rgb_bands
from ._version import __version__
from .config import PruneConfig
from .errors import ConfigError, RsPruneError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _add_config_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pruning")
    g.add_argument("--prune-ratio", type=float, default=0.85, help="share to drop (default 0.85)")
    stage1 = g.add_mutually_exclusive_group()
    stage1.add_argument("--entropy-keep", type=float, help="Stage I: keep this share by entropy")
    stage1.add_argument("--entropy-threshold", type=float, help="Stage I: keep entropy >= T bits")
    stage1.add_argument(
        "--no-entropy-filter",
        action="store_true",
        help="no Stage I unless --entropy-keep/--entropy-threshold (default: auto)",
    )
    g.add_argument("--strategy", default="rsprune", help="rsprune (default) or a baseline")
    g.add_argument("--seed", type=int, default=0, help="seed of the random strategy")
    g.add_argument(
        "--max-nodata",
        type=float,
        default=None,
        help="drop samples with more no-data than this share (default 0.05; negative disables)",
    )
    g.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="'COLUMN OP NUMBER'",
        help="metadata filter on an index column, e.g. --where 'cloud_cover<=0.1' "
        "(OP: < <= > >= == !=; repeat to AND several)",
    )
    g.add_argument(
        "--max-cloud",
        type=float,
        default=None,
        help="drop samples whose pixel cloud/haze score exceeds this share (default off)",
    )
    g.add_argument(
        "--dedup-threshold",
        type=float,
        default=None,
        metavar="TAU",
        help="drop near-duplicates (cosine >= TAU to a kept, more central sample of "
        "the cluster) before Stage II; needs index --store-embeddings",
    )


def config_from_args(a: argparse.Namespace) -> PruneConfig:
    """The :class:`PruneConfig` named by the pruning arguments."""
    from .config import DEFAULT_MAX_NODATA
    from .filters import parse_clause

    max_nodata: float | None = DEFAULT_MAX_NODATA if a.max_nodata is None else a.max_nodata
    if max_nodata is not None and max_nodata < 0:
        max_nodata = None
    return PruneConfig(
        prune_ratio=a.prune_ratio,
        entropy_keep=a.entropy_keep,
        entropy_threshold=a.entropy_threshold,
        entropy_filter="none" if a.no_entropy_filter else "auto",
        strategy=a.strategy,
        seed=a.seed,
        max_nodata=max_nodata,
        where=tuple(parse_clause(w) for w in a.where),
        max_cloud=a.max_cloud,
        dedup_threshold=a.dedup_threshold,
    )


def _cmd_pack(a: argparse.Namespace) -> int:
    from .pack import pack_folder

    if a.source_format == "folder":
        res = pack_folder(
            a.src_dir,
            a.out_dir,
            shard_size=a.shard_size,
            prefix=a.prefix,
            progress=not a.quiet,
            overwrite=a.overwrite,
            follow_symlinks=a.follow_symlinks,
        )
    else:
        from .pack_table import pack_table

        image_column = (
            a.path_column
            if a.source_format == "csv" and a.path_column
            else (a.image_column or ("path" if a.source_format == "csv" else "image"))
        )
        res = pack_table(
            a.src_dir,
            a.out_dir,
            fmt=a.source_format,
            image_column=image_column,
            keep_columns=[c for c in (a.keep_columns or "").split(",") if c],
            caption_column=a.caption_column,
            key_column=a.key_column,
            base_dir=a.base_dir,
            shard_size=a.shard_size,
            prefix=a.prefix,
            workers=a.workers,
            overwrite=a.overwrite,
            progress=not a.quiet,
        )
    resumed = getattr(res, "resumed_shards", 0)
    kept = f" ({resumed} kept from an earlier run)" if resumed else ""
    print(f"packed {res.num_samples:,} images into {len(res.shards)} shard(s) in {a.out_dir}{kept}")
    for path, why in res.skipped[:20]:
        print(f"skipped {path}: {why}", file=sys.stderr)
    if len(res.skipped) > 20:
        print(
            f"... and {len(res.skipped) - 20} more skipped ({len(res.skipped)} in all)",
            file=sys.stderr,
        )
    return EXIT_OK


def _load_encoder(a: argparse.Namespace, default: str | None = None):  # type: ignore[no-untyped-def]
    from .encoders import load_encoder

    spec = a.encoder or default or "efficientnet-lite0"
    kwargs = {"checkpoint": a.checkpoint, "device": a.device}
    if getattr(a, "image_size", None):
        kwargs["image_size"] = a.image_size
    return load_encoder(spec, **kwargs)


def _cmd_centroids(a: argparse.Namespace) -> int:
    from .centroids import build_centroids

    check_output_file("--output", a.output)  # before hours of embedding, not after
    enc = _load_encoder(a)
    cents = build_centroids(
        a.ref_dirs,
        enc,
        k=a.k,
        seed=a.seed,
        batch_size=a.batch_size,
        num_workers=a.workers,
        progress=not a.quiet,
    )
    cents.save(a.output)
    counts = ", ".join(f"{d}: {c}" for d, c in zip(cents.ref_dirs, cents.ref_counts, strict=True))
    print(
        f"wrote {a.output}: K={cents.centroids.shape[0]} dim={cents.centroids.shape[1]} "
        f"encoder={cents.encoder} digest={cents.digest} ({counts})"
    )
    return EXIT_OK


def _cmd_index(a: argparse.Namespace) -> int:
    from .indexer import index_shards

    rgb_bands = check_rgb_bands(list(a.rgb_bands))
    if a.index_dir is not None and Path(a.index_dir).exists() and not Path(a.index_dir).is_dir():
        raise ConfigError(
            f"`--index-dir`={a.index_dir!r} is a file, a folder is needed; "
            "remove it or choose another path"
        )
    if a.report_json is not None and not Path(a.report_json).parent.is_dir():
        raise ConfigError(
            f"--report-json {a.report_json}: its folder does not exist; create it "
            "or pick another path"
        )
    if a.decode_budget is not None and not a.decode_budget > 0:
        raise ConfigError(f"--decode-budget must be > 0 MiB, got {a.decode_budget}")
    budget = None if a.decode_budget is None else int(a.decode_budget * (1 << 20))
    cents = enc = None
    if a.centroids:
        from .centroids import Centroids

        cents = Centroids.load(a.centroids)
        enc = _load_encoder(a, default=cents.encoder_spec)
    basis = None
    if a.pca_basis:
        from .embeddings import PcaBasis

        basis = PcaBasis.load(a.pca_basis)
    report = index_shards(
        a.shards,
        centroids=cents,
        encoder=enc,
        index_dir=a.index_dir,
        storage_options=_storage_options(a.storage_options),
        workers=a.workers,
        batch_size=a.batch_size,
        rank=a.rank,
        world_size=a.world_size,
        force=a.force,
        fast_gray=a.fast_gray,
        rgb_bands=rgb_bands,
        overwrite=a.overwrite,
        decode_budget=budget if not a.no_decode_budget else None,
        image_key=a.image_key,
        meta_fields=a.meta or (),
        cloud_score=a.cloud_score,
        store_embeddings=a.store_embeddings,
        pca_basis=basis,
        progress=not a.quiet,
    )
    for line in report.lines():
        print(line, file=sys.stderr if line.startswith("FAILED") else sys.stdout)
    if a.report_json is not None:
        report.write_json(a.report_json)
    return EXIT_OK if report.ok else EXIT_FAILED


def _cmd_reassign(a: argparse.Namespace) -> int:
    from .centroids import Centroids
    from .reassign import reassign_shards

    report = reassign_shards(
        a.shards,
        Centroids.load(a.centroids),
        index_dir=a.index_dir,
        rank=a.rank,
        world_size=a.world_size,
        progress=not a.quiet,
    )
    for line in report.lines():
        print(line, file=sys.stderr if line.startswith("FAILED") else sys.stdout)
    return EXIT_OK if report.ok else EXIT_FAILED


def _cmd_pca_basis(a: argparse.Namespace) -> int:
    from .dedup_cache import load_embeddings
    from .embeddings import fit_pca
    from .index import PruneIndex

    index = PruneIndex.load(a.shards, index_dir=a.index_dir)
    emb = load_embeddings(index)
    basis = fit_pca(emb[index.valid], a.dims, encoder=index.encoder, max_rows=a.max_rows)
    basis.save(a.output)
    print(f"wrote {a.output}: {basis.dims} of {emb.shape[1]} dims, encoder {index.encoder}")
    return EXIT_OK


def _storage_options(text: str | None) -> dict[str, object] | None:
    """``--storage-options JSON`` -> a dict (fsspec options for URL shards)."""
    from .errors import ConfigError

    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"--storage-options must be a JSON object, got {text!r} ({exc}): for "
            """example '{"anon": true}'"""
        ) from None
    if not isinstance(value, dict):
        raise ConfigError(f"--storage-options must be a JSON object, got {text!r}")
    return value


def _cmd_select(a: argparse.Namespace) -> int:
    from .index import PruneIndex

    if a.output:
        check_output_file("--output", a.output)
    index = PruneIndex.load(a.shards, index_dir=a.index_dir)
    cfg = config_from_args(a)
    selected = index.select(cfg)
    summary = index.summary(cfg, selected)
    if a.json:
        print(json.dumps(summary, indent=2))
    else:
        rule, thr, keep = (
            summary["stage1_rule"],
            summary["entropy_threshold"],
            summary["entropy_keep"],
        )
        stage1 = (
            f"auto cut at {thr:.2f} bits"
            if rule == "auto"
            else f"entropy >= {thr:g} bits"
            if rule == "threshold"
            else f"top {keep:g} by entropy"
            if rule == "keep"
            else "off"
        )
        print(
            f"samples {summary['samples']:,}  budget {summary['budget']:,} "
            f"(prune ratio {cfg.prune_ratio:g}, strategy {cfg.strategy})"
        )
        nodata = "off" if cfg.max_nodata is None else f"> {cfg.max_nodata:g}"
        filters = "".join(
            f"  where {w['filter']} dropped {w['dropped']:,}" for w in summary["where"]
        )
        if cfg.max_cloud is not None:
            filters += f"  cloud/haze (> {cfg.max_cloud:g}) dropped {summary['cloud_dropped']:,}"
        dups = (
            f"  near-duplicates (tau {cfg.dedup_threshold:g}) dropped "
            f"{summary['duplicates_dropped']:,}"
            if cfg.dedup_threshold is not None
            else ""
        )
        print(
            f"  invalid {summary['invalid']:,}  no-data ({nodata}) dropped "
            f"{summary['nodata_dropped']:,}{filters}  Stage I ({stage1}) dropped "
            f"{summary['stage1_dropped']:,}{dups}  candidates {summary['candidates']:,}"
        )
        print(
            f"  kept {summary['selected']:,}  shortfall {summary['shortfall']:,}  clusters "
            f"covered {summary['clusters_covered']}/{summary['clusters_in_pool']} in pool "
            f"(K={summary['num_clusters']})"
        )
    if a.output:
        atomic_write_text(a.output, format_keys(index.keys, selected.tolist(), a.output))
        print(f"wrote {len(selected):,} keys to {a.output}", file=sys.stderr)
    return EXIT_OK


def format_keys(keys: Sequence[str], positions: Sequence[int], output: str) -> str:
    """The kept keys as a file: a JSON list for ``*.json``, else one key per line (UTF-8).

    A key holding a line break cannot be written one per line without changing it, so it is
    refused with the fix (a ``.json`` file holds any key exactly).
    """
    chosen = [keys[i] for i in positions]
    if output.lower().endswith(".json"):
        return json.dumps(chosen, ensure_ascii=False) + "\n"
    for i, key in zip(positions, chosen, strict=True):
        if "\n" in key or "\r" in key:
            raise ConfigError(
                f"key {key!r} (global position {i}) contains a line break, which a one-key-per-line "
                f"file cannot hold: write the keys as JSON instead (`-o {Path(output).stem}.json`)"
            )
    return "".join(f"{k}\n" for k in chosen)


def _cmd_report(a: argparse.Namespace) -> int:
    from .report import write_report

    check_output_dir("--output", a.output)
    out = write_report(
        a.shards,
        a.output,
        config_from_args(a),
        index_dir=a.index_dir,
        centroids=a.centroids,
        progress=not a.quiet,
    )
    print(f"wrote {out}")
    return EXIT_OK


def _cmd_demo(a: argparse.Namespace) -> int:
    from .demo import run_demo

    check_output_dir("--out", a.out)
    return run_demo(Path(a.out), quick=a.quick, progress=not a.quiet)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="rsprune-data",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "pack",
        help="turn a folder of images, or Parquet/Arrow/HF/CSV tables, into WebDataset tar shards",
    )
    p.add_argument(
        "src_dir",
        help="a folder of images; with --from: a file or quoted glob "
        "('data/*.parquet'), or an HF save_to_disk folder",
    )
    p.add_argument("out_dir")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--prefix", default="shard", help="shard name prefix (default 'shard')")
    p.add_argument(
        "--from",
        dest="source_format",
        default="folder",
        choices=("folder", "parquet", "arrow", "hf", "csv"),
        help="what src_dir is (default: folder)",
    )
    p.add_argument(
        "--image-column",
        default=None,
        help="table column with the image bytes or HF Image struct (default 'image')",
    )
    p.add_argument(
        "--path-column", default=None, help="csv: column with the image file path (default 'path')"
    )
    p.add_argument(
        "--base-dir",
        default=None,
        help="csv: folder relative paths start from (default: the CSV's folder)",
    )
    p.add_argument(
        "--keep-columns",
        default=None,
        metavar="COL,...",
        help="columns to write into each sample's .json member",
    )
    p.add_argument("--caption-column", default=None, help="text column also written as .txt")
    p.add_argument(
        "--key-column",
        default=None,
        help="column of unique sample keys (default '<file stem>-<row>')",
    )
    p.add_argument("--workers", type=int, default=1, help="processes writing shards (tables)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace shards already in out_dir (default: resume a killed run of the "
        "same settings, refuse others)",
    )
    p.add_argument(
        "--follow-symlinks",
        action="store_true",
        help="pack files that symbolic links lead to outside src_dir, follow linked "
        "folders (default: skip them with a reason)",
    )
    p.set_defaults(fn=_cmd_pack)

    def encoder_args(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--encoder",
            default=None,
            help="efficientnet-lite0 (default), open_clip:MODEL or hf:PATH",
        )
        p.add_argument(
            "--checkpoint",
            default=None,
            help="local weights: an open_clip .pt file, or a local folder for an hf: hub name "
            "(pass it again to `index`; centroid files do not store it)",
        )
        p.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda:N")
        p.add_argument("--workers", type=int, default=2, help="decoding worker processes")
        p.add_argument("--batch-size", type=int, default=64)

    p = sub.add_parser("centroids", help="embed reference folders and cluster them (k-means)")
    p.add_argument("ref_dirs", nargs="+", help="folders laid out as DIR/CLASS/IMAGE")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--k", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    encoder_args(p)
    p.set_defaults(fn=_cmd_centroids)

    p = sub.add_parser("index", help="write one .rsidx.safetensors index per shard")
    p.add_argument("shards", nargs="+")
    p.add_argument("--centroids", help="centroids file; without it, entropy-only indexes")
    p.add_argument(
        "--index-dir",
        help="write indexes here instead of beside the shards (required for URL shards)",
    )
    p.add_argument(
        "--storage-options",
        metavar="JSON",
        help="fsspec options for URL shards (https://, s3://, gs://, hf://), e.g. "
        """'{"anon": true}' or '{"client_kwargs": {"endpoint_url": "..."}}'""",
    )
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--world-size", type=int, default=None)
    p.add_argument("--force", action="store_true", help="index again even when current")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="allow replacing indexes of another kind (other encoder, centroids, K, "
        "entropy-only over embeddings); without it such a run exits 2 first",
    )
    p.add_argument(
        "--report-json",
        metavar="PATH",
        help="also write the run's report (indexed, skipped, FAILED shards with "
        "reasons, invalid-sample counts) as JSON, atomically",
    )
    budget = p.add_mutually_exclusive_group()
    budget.add_argument(
        "--decode-budget",
        type=float,
        default=None,
        metavar="MiB",
        help="decoded raster per image before reduced-resolution decoding or "
        "too_large (default 256 MiB)",
    )
    budget.add_argument(
        "--no-decode-budget",
        action="store_true",
        help="decode every image at full size, whatever it costs",
    )
    p.add_argument(
        "--rgb-bands",
        type=int,
        nargs=3,
        default=(0, 1, 2),
        metavar=("R", "G", "B"),
        help="0-based bands that make RGB in multi-band GeoTIFFs (default 0 1 2)",
    )
    p.add_argument(
        "--fast-gray",
        action="store_true",
        help="entropy-only: decode JPEG to libjpeg's Y (2x faster, not PIL-exact)",
    )
    p.add_argument(
        "--image-key",
        default=None,
        help="the member holding the image, e.g. img_content (default: the first "
        "jpg/jpeg/png/tif/tiff/npy member)",
    )
    p.add_argument(
        "--meta",
        default=None,
        metavar="FIELD,...",
        help="numeric fields of each sample's .json member to store in the index "
        "(for --where), e.g. --meta cloud_cover,gsd",
    )
    p.add_argument(
        "--cloud-score",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="store the pixel cloud/haze score score.cloud, for --max-cloud (default: "
        "with --centroids only; it roughly halves entropy-only throughput)",
    )
    p.add_argument(
        "--store-embeddings",
        nargs="?",
        const="float16",
        default=None,
        choices=("float16", "int8", "pca"),
        help="also write <shard>.rsemb.safetensors (default form float16) for "
        "`reassign` and --dedup-threshold",
    )
    p.add_argument(
        "--pca-basis",
        help="PCA basis file for --store-embeddings pca "
        "(rsprune_data.embeddings.fit_pca + PcaBasis.save)",
    )
    encoder_args(p)
    p.set_defaults(fn=_cmd_index)

    p = sub.add_parser(
        "reassign",
        help="new centroids from stored embeddings (no decode, no encoder); rewrites the indexes",
    )
    p.add_argument("shards", nargs="+")
    p.add_argument("--centroids", required=True, help="the new centroids file")
    p.add_argument("--index-dir", help="where the indexes and sidecars are")
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--world-size", type=int, default=None)
    p.set_defaults(fn=_cmd_reassign)

    p = sub.add_parser(
        "pca-basis", help="fit a PCA basis on stored embeddings (for --store-embeddings pca)"
    )
    p.add_argument("shards", nargs="+", help="shards indexed with --store-embeddings")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--dims", type=int, default=128, help="components kept (default 128)")
    p.add_argument("--max-rows", type=int, default=50_000, help="fit on a seeded sample this size")
    p.add_argument("--index-dir")
    p.set_defaults(fn=_cmd_pca_basis)

    p = sub.add_parser("select", help="print what a pruning keeps; optionally write the keys")
    p.add_argument("shards", nargs="+")
    p.add_argument("--index-dir")
    p.add_argument(
        "-o",
        "--output",
        help="write the kept keys, one per line (a JSON list when "
        "the name ends in .json; keys with line breaks need .json)",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    _add_config_args(p)
    p.set_defaults(fn=_cmd_select)

    p = sub.add_parser("report", help="HTML page + PNG figures to judge a pruning")
    p.add_argument("shards", nargs="+")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--index-dir")
    p.add_argument("--centroids", help="centroids file (adds reference-class composition)")
    _add_config_args(p)
    p.set_defaults(fn=_cmd_report)

    p = sub.add_parser("demo", help="the whole job on the sample images shipped in the repo")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--quick", action="store_true", help="shorter training (tests)")
    p.set_defaults(fn=_cmd_demo)

    for sp in sub.choices.values():
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    try:
        return int(a.fn(a))
    except RsPruneError as exc:
        print(f"rsprune-data {a.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # the job ran but the system failed it (disk full, I/O error, ...)
        where = f" ({exc.filename})" if exc.filename else ""
        print(
            f"rsprune-data {a.command}: failed: {exc.strerror or exc}{where}; fix it and rerun "
            "the same command (finished work is kept)",
            file=sys.stderr,
        )
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
