"""Pack tabular corpora (Parquet, Arrow IPC, HF ``datasets`` saved to disk, CSV lists) into
WebDataset tar shards, through pyarrow alone; image bytes are copied, never re-encoded.

Rows are numbered globally in the order of the input files (sorted glob matches, or the order of an
HF dataset's ``state.json``), then row order inside each file. Shard ``i`` holds global rows
``i * shard_size`` to ``(i + 1) * shard_size - 1``. The plan of which file rows make which shard is
derived from metadata only (Parquet footers, Arrow batch lengths of a memory map, the CSV itself), so
any shard can be written alone, by any process, and always holds the same bytes.

Each sample has:

- ``__key__``: the ``key_column`` value if given (``.`` and ``/`` replaced by ``_``: webdataset splits
  the extension at the first dot), else ``<file stem>-<row in file>`` (stem dots replaced by ``_``);
  a key repeated inside one shard is an error;
- the image bytes as they are, under the extension their leading bytes say (``jpg``, ``png``,
  ``tif``, ``npy``, ``webp``; ``bin`` when unknown). The image column is either binary or HF's
  ``Image`` feature, a struct of ``bytes`` and ``path`` (``path`` is read, relative to the input
  file's folder, when ``bytes`` is null). CSV lists give a path column instead;
- ``json``: the ``keep_columns`` of the row (plain JSON; NaN becomes null);
- ``txt``: the ``caption_column`` as UTF-8 text, when asked for.

A row whose image is null, empty or unreadable is skipped and listed (file, row, reason) in
:attr:`~rsprune_data.pack.PackResult.skipped`; the shard keeps its other rows (a shard may therefore
hold fewer than ``shard_size`` samples, and skipped rows never shift later shards).

Memory: Parquet is read one row group at a time in batches of :data:`BATCH_ROWS` rows, restricted to
the columns needed; Arrow files are memory-mapped. Resume: every shard is written to
``<name>.partial``, fsynced and renamed, and a manifest ``<prefix>.pack.json`` records the inputs
(size, mtime) and options; a rerun with the same manifest skips shards already there, and a
different one refuses to mix unless ``overwrite``. Parallel: ``workers`` processes take shards
``w, w + W, ...``; under ``torchrun`` (or ``rank``/``world_size``) each rank takes ``r, r + R, ...``
first.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from ._deps import lazy_import
from ._fsio import atomic_write_text, publish_file
from ._validate import check_int
from .errors import ConfigError
from .pack import PackResult
from .tarwrite import TarOut

FORMATS = ("parquet", "arrow", "hf", "csv")
BATCH_ROWS = 256
MANIFEST_SUFFIX = ".pack.json"
_PARTIAL = ".partial"
_MAGICS = (
    (b"\xff\xd8", "jpg"),
    (b"\x89PNG", "png"),
    (b"II*\x00", "tif"),
    (b"MM\x00*", "tif"),
    (b"II+\x00", "tif"),
    (b"MM\x00+", "tif"),
    (b"\x93NUMPY", "npy"),
    (b"GIF8", "gif"),
    (b"BM", "bmp"),
)
_UNSAFE_KEY = re.compile(r"[./\\\s]")


@dataclass(frozen=True)
class TableSpec:
    """What to read from every input file (picklable, sent to worker processes)."""

    fmt: str
    files: tuple[str, ...]
    image_column: str
    keep_columns: tuple[str, ...]
    caption_column: str | None
    key_column: str | None
    base_dir: str | None  # csv: folder the path column is relative to

    @property
    def columns(self) -> list[str]:
        cols = [self.image_column, *self.keep_columns]
        cols += [c for c in (self.caption_column, self.key_column) if c is not None]
        return list(dict.fromkeys(cols))


@dataclass(frozen=True)
class _Slice:
    file: int
    start: int  # rows of that file
    stop: int


def pack_table(
    sources: Sequence[str | os.PathLike[str]] | str,
    out_dir: str | os.PathLike[str],
    *,
    fmt: str = "parquet",
    image_column: str = "image",
    keep_columns: Sequence[str] = (),
    caption_column: str | None = None,
    key_column: str | None = None,
    base_dir: str | os.PathLike[str] | None = None,
    shard_size: int = 1000,
    prefix: str = "shard",
    workers: int = 1,
    rank: int | None = None,
    world_size: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> PackResult:
    """Pack table rows into ``out_dir/{prefix}-000000.tar``, ... (see the module docstring).

    Args:
        sources: files or glob patterns (``'data/*.parquet'``), each pattern's matches sorted; for
            ``fmt="hf"`` the folder written by ``Dataset.save_to_disk``.
        out_dir: folder for the shards, created if missing.
        fmt: ``"parquet"``, ``"arrow"`` (IPC file or stream), ``"hf"`` or ``"csv"``.
        image_column: the column with the image (binary or an ``Image`` struct); for CSV, the
            column with the image path.
        keep_columns: columns written to each sample's ``json`` member.
        caption_column: a text column also written as the ``txt`` member.
        key_column: a column whose values become ``__key__`` (default ``<file stem>-<row>``).
        base_dir: CSV only: the folder that relative paths start from (default: the CSV's folder).
        shard_size: rows per shard.
        prefix: shard file name prefix.
        workers: processes writing shards (1 = in this process).
        rank, world_size: this process's share under a launcher (default: torchrun's environment).
        overwrite: replace the shards and manifest of a different earlier run.
        progress: show a tqdm bar over shards.

    Returns:
        :class:`~rsprune_data.pack.PackResult` of the shards this rank wrote or found complete.

    Raises:
        ConfigError: no input, an unknown format or column, bad sizes, or another run's shards.
    """
    from .pack import check_prefix
    from .world import distributed_rank

    spec = _spec(sources, fmt, image_column, keep_columns, caption_column, key_column, base_dir)
    shard_size = check_int("shard_size", shard_size, 1)
    workers = check_int("workers", workers, 1)
    check_prefix(prefix)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = [_num_rows(spec, i) for i in range(len(spec.files))]
    total = sum(counts)
    if total == 0:
        raise ConfigError(f"sources {list(spec.files)} hold no rows: nothing to pack")
    num_shards = math.ceil(total / shard_size)
    manifest = {
        "format": "rsprune-pack",
        "version": "1",
        "spec": asdict(spec),
        "inputs": [_stamp(f) for f in spec.files],
        "rows": counts,
        "shard_size": shard_size,
        "num_shards": num_shards,
    }
    _check_manifest(out, prefix, manifest, overwrite)
    r, size = distributed_rank(rank, world_size)
    mine = list(range(num_shards))[r::size]
    names = [out / f"{prefix}-{i:06d}.tar" for i in range(num_shards)]
    todo = [i for i in mine if not names[i].exists()]
    for i in mine:
        Path(str(names[i]) + _PARTIAL).unlink(missing_ok=True)
    from tqdm.auto import tqdm

    skipped: list[tuple[str, str]] = []
    written = 0
    bar = tqdm(
        total=len(mine),
        initial=len(mine) - len(todo),
        unit="shard",
        desc=f"pack {spec.fmt}",
        disable=not progress,
    )
    jobs = [(spec, _plan(counts, shard_size, i), str(names[i])) for i in todo]
    if workers == 1 or len(jobs) <= 1:
        results: Iterator[tuple[int, list[tuple[str, str]]]] = (_write_shard(*j) for j in jobs)
        for n, sk in results:
            written += n
            skipped += sk
            bar.update(1)
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        ctx = mp.get_context("spawn")  # no forked copies of the caller's threads or arrow pools
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx) as pool:
            for n, sk in pool.map(_write_shard, *zip(*jobs, strict=True)):
                written += n
                skipped += sk
                bar.update(1)
    bar.close()
    if len(todo) < len(mine):  # shards from an earlier run of the same manifest
        written += _count_existing([names[i] for i in mine if i not in set(todo)])
    return PackResult(shards=[names[i] for i in mine], num_samples=written, skipped=skipped)


# --- inputs and plan -----------------------------------------------------------------------------
def _spec(
    sources: Sequence[str | os.PathLike[str]] | str,
    fmt: str,
    image_column: str,
    keep_columns: Sequence[str] | str,
    caption_column: str | None,
    key_column: str | None,
    base_dir: str | os.PathLike[str] | None,
) -> TableSpec:
    if fmt not in FORMATS:
        raise ConfigError(f"`fmt` must be one of {list(FORMATS)}, got {fmt!r}")
    items = [sources] if isinstance(sources, str | os.PathLike) else list(sources)
    if isinstance(keep_columns, str):
        keep_columns = [c for c in keep_columns.split(",") if c]
    files: list[str] = []
    for item in items:
        s = os.fspath(item)
        if fmt == "hf":
            files += _hf_files(s)
            continue
        hits = sorted(glob.glob(s)) if glob.has_magic(s) else [s]
        missing = [h for h in hits if not os.path.isfile(h)]
        if not hits or missing:
            raise ConfigError(
                f"source {s!r} matches no {fmt} file{f' ({missing[0]})' if missing else ''}: "
                "pass existing files or a quoted glob such as 'data/*.parquet'"
            )
        files += hits
    if not files:
        raise ConfigError("`sources` is empty: pass at least one input file or pattern")
    if len(set(files)) < len(files):
        raise ConfigError(f"`sources` lists a file twice ({files}): each input may appear once")
    spec = TableSpec(
        fmt,
        tuple(os.path.abspath(f) for f in files),
        image_column,
        tuple(keep_columns),
        caption_column,
        key_column,
        None if base_dir is None else os.path.abspath(base_dir),
    )
    _check_columns(spec)
    return spec


def _hf_files(folder: str) -> list[str]:
    state = Path(folder) / "state.json"
    try:
        doc = json.loads(state.read_text())
        names = [d["filename"] for d in doc["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"{folder!r} is not a dataset saved with `Dataset.save_to_disk` (reading "
            f"{state}: {exc}); pass the folder that holds state.json, or one split of "
            "a DatasetDict (e.g. data/train)"
        ) from None
    return [str(Path(folder) / n) for n in names]


def _schema(spec: TableSpec, i: int) -> Any:
    pa = lazy_import("pyarrow")
    path = spec.files[i]
    if spec.fmt == "parquet":
        return lazy_import("pyarrow.parquet").read_schema(path)
    if spec.fmt == "csv":
        return _read_csv(path).schema
    with _open_ipc(path) as reader:
        schema = reader.schema
    return pa.schema(list(schema))


def _check_columns(spec: TableSpec) -> None:
    pa = lazy_import("pyarrow")
    for i, path in enumerate(spec.files):
        schema = _schema(spec, i)
        missing = [c for c in spec.columns if schema.get_field_index(c) < 0]
        if missing:
            raise ConfigError(
                f"{path} has no column(s) {missing}; its columns are "
                f"{schema.names}: pass --image-column/--keep-columns that exist"
            )
        if spec.fmt == "csv":
            continue
        t = schema.field(spec.image_column).type
        ok = (
            pa.types.is_binary(t)
            or pa.types.is_large_binary(t)
            or (pa.types.is_struct(t) and t.get_field_index("bytes") >= 0)
        )
        if not ok:
            raise ConfigError(
                f"image column {spec.image_column!r} of {path} is {t}; expected "
                "binary or a struct {bytes, path} (HF Image)"
            )
        binary = [c for c in spec.keep_columns if _is_binary(pa, schema.field(c).type)]
        if binary:
            raise ConfigError(
                f"keep_columns {binary} of {path} are binary and cannot go into the "
                ".json member: keep only text and numeric columns"
            )


def _is_binary(pa: Any, t: Any) -> bool:
    return bool(
        pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t)
    )


class _open_ipc:
    """An Arrow IPC reader over a memory map, file or stream format, as a context manager."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __enter__(self) -> Any:
        pa = lazy_import("pyarrow")
        self.source = pa.memory_map(self.path)
        try:
            return pa.ipc.open_file(self.source)
        except pa.ArrowInvalid:
            self.source.seek(0)
            return pa.ipc.open_stream(self.source)

    def __exit__(self, *exc: object) -> None:
        self.source.close()


@lru_cache(maxsize=2)  # each shard of a CSV list would otherwise parse the whole list again
def _read_csv(path: str) -> Any:
    csv = lazy_import("pyarrow.csv")
    return csv.read_csv(path)


def _num_rows(spec: TableSpec, i: int) -> int:
    path = spec.files[i]
    if spec.fmt == "parquet":
        return int(lazy_import("pyarrow.parquet").ParquetFile(path).metadata.num_rows)
    if spec.fmt == "csv":
        return int(_read_csv(path).num_rows)
    with _open_ipc(path) as reader:  # batch lengths of a memory map: nothing is copied
        return sum(b.num_rows for b in _ipc_batches(reader))


def _ipc_batches(reader: Any) -> Iterator[Any]:
    if hasattr(reader, "num_record_batches"):
        for j in range(reader.num_record_batches):
            yield reader.get_batch(j)
    else:
        yield from reader


def _plan(counts: Sequence[int], shard_size: int, shard: int) -> list[_Slice]:
    """Which rows of which files make ``shard`` (from row counts alone)."""
    lo, hi = shard * shard_size, (shard + 1) * shard_size
    out, base = [], 0
    for f, n in enumerate(counts):
        a, b = max(lo, base), min(hi, base + n)
        if a < b:
            out.append(_Slice(f, a - base, b - base))
        base += n
    return out


def _stamp(path: str) -> dict[str, Any]:
    st = os.stat(path)
    return {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _check_manifest(out: Path, prefix: str, manifest: dict[str, Any], overwrite: bool) -> None:
    path = out / (prefix + MANIFEST_SUFFIX)
    old: Any = None
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = None
    pattern = re.compile(re.escape(prefix) + r"-\d{6}\.tar")
    shards = sorted(p for p in out.iterdir() if pattern.fullmatch(p.name))
    if old == json.loads(json.dumps(manifest)):  # as JSON: tuples are lists
        return
    if shards and not overwrite:
        why = "another input or options" if old is not None else "an unknown earlier run"
        raise ConfigError(
            f"out_dir={str(out)!r} already holds {len(shards)} shard(s) named "
            f"{prefix}-NNNNNN.tar from {why}: pass overwrite=True (--overwrite), or "
            "choose another out_dir or prefix"
        )
    for p in shards:
        p.unlink()
    atomic_write_text(path, json.dumps(manifest, indent=1, sort_keys=True))


def _count_existing(paths: Sequence[Path]) -> int:
    from .tario import scan_tar

    return sum(len(scan_tar(p)) for p in paths)


# --- one shard -----------------------------------------------------------------------------------
def _rows(spec: TableSpec, sl: _Slice) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(row in file, {column: python value})`` for the rows of one slice, in order."""
    cols = spec.columns
    path = spec.files[sl.file]
    if spec.fmt == "csv":
        table = _read_csv(path).select(cols).slice(sl.start, sl.stop - sl.start)
        batches: Iterator[tuple[int, Any]] = iter([(sl.start, table)])
        yield from _expand(batches)
        return
    if spec.fmt == "parquet":
        pf = lazy_import("pyarrow.parquet").ParquetFile(path)
        md, base, groups, first = pf.metadata, 0, [], None
        for g in range(md.num_row_groups):
            n = md.row_group(g).num_rows
            if base < sl.stop and base + n > sl.start:
                groups.append(g)
                first = base if first is None else first
            base += n
        yield from _expand(
            _clip(
                _offsets(
                    first or 0,
                    pf.iter_batches(batch_size=BATCH_ROWS, row_groups=groups, columns=cols),
                ),
                sl,
            )
        )
        return
    with _open_ipc(path) as reader:
        yield from _expand(_clip(_offsets(0, (b.select(cols) for b in _ipc_batches(reader))), sl))


def _offsets(first: int, batches: Iterator[Any]) -> Iterator[tuple[int, Any]]:
    row = first
    for b in batches:
        yield row, b
        row += b.num_rows


def _clip(batches: Iterator[tuple[int, Any]], sl: _Slice) -> Iterator[tuple[int, Any]]:
    for row, b in batches:
        if row >= sl.stop:
            return
        a, z = max(sl.start, row), min(sl.stop, row + b.num_rows)
        if a < z:
            yield a, b.slice(a - row, z - a)


def _expand(batches: Iterator[tuple[int, Any]]) -> Iterator[tuple[int, dict[str, Any]]]:
    for row, b in batches:
        for j, rec in enumerate(b.to_pylist()):
            yield row + j, rec


def _image_bytes(spec: TableSpec, value: Any, folder: str) -> tuple[bytes | None, str | None, str]:
    """(bytes, path hint, why missing) of one image cell."""
    path: str | None = None
    data: Any = value
    if spec.fmt == "csv":
        if value is None or value == "":
            return None, None, "empty path"
        path, data = str(value), None
    elif isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
    if data is None and path:
        full = path if os.path.isabs(path) else os.path.join(spec.base_dir or folder, path)
        try:
            data = Path(full).read_bytes()
        except OSError as exc:
            return None, path, f"unreadable image file {full}: {exc.strerror or exc}"
    if not data:
        return None, path, "null or empty image"
    return bytes(data), path, ""


def image_ext(data: bytes, path: str | None = None) -> str:
    """The member extension for image bytes: from the leading bytes, else the path's, else ``bin``."""
    for magic, ext in _MAGICS:
        if data.startswith(magic):
            return ext
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if path and "." in os.path.basename(path):
        ext = path.rsplit(".", 1)[-1].lower()
        if ext.isalnum():
            return ext
    return "bin"


def _json_value(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): _json_value(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_json_value(x) for x in v]
    if v is None or isinstance(v, str | int | float | bool):
        return v
    return str(v)  # dates, decimals: their text form


def safe_key(value: Any) -> str:
    """``value`` as a tar-safe ``__key__``: dots, slashes, backslashes and whitespace become ``_``."""
    return _UNSAFE_KEY.sub("_", str(value))


def _write_shard(
    spec: TableSpec, plan: Sequence[_Slice], name: str
) -> tuple[int, list[tuple[str, str]]]:
    """Write one shard atomically; returns (samples written, skipped rows)."""
    partial = name + _PARTIAL
    skipped: list[tuple[str, str]] = []
    keys: set[str] = set()
    n = 0
    try:
        with open(partial, "wb") as f:
            writer = TarOut(f)
            for sl in plan:
                path = spec.files[sl.file]
                folder, stem = os.path.dirname(path), Path(path).name.split(".")[0] or "_"
                for row, rec in _rows(spec, sl):
                    where = f"{os.path.basename(path)}:{row}"
                    data, hint, why = _image_bytes(spec, rec[spec.image_column], folder)
                    if data is None:
                        skipped.append((where, why))
                        continue
                    key = (
                        safe_key(rec[spec.key_column])
                        if spec.key_column is not None
                        else f"{safe_key(stem)}-{row}"
                    )
                    if not key or key in keys:
                        raise ConfigError(
                            f"key {key!r} of row {where} is empty or repeats an "
                            f"earlier row of shard {os.path.basename(name)}: "
                            "choose a key column with unique values"
                        )
                    keys.add(key)
                    sample: dict[str, Any] = {"__key__": key, image_ext(data, hint): data}
                    if spec.keep_columns:
                        meta = {c: _json_value(rec[c]) for c in spec.keep_columns}
                        sample["json"] = json.dumps(
                            meta, ensure_ascii=False, allow_nan=False
                        ).encode("utf-8")
                    if spec.caption_column is not None:
                        cap = rec[spec.caption_column]
                        sample["txt"] = ("" if cap is None else str(cap)).encode("utf-8")
                    out = [
                        p
                        for m, v in sample.items()
                        if m != "__key__"
                        for p in writer.parts(f"{key}.{m}", v)
                    ]
                    f.writelines(out)
                    n += 1
            writer.close()  # the end-of-archive blocks, before the fsync
            f.flush()
        publish_file(partial, name)  # fsync the shard, rename, fsync the folder
    finally:
        Path(partial).unlink(missing_ok=True)
    return n, skipped
