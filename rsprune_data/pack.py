"""Pack a folder of images into WebDataset tar shards, byte for byte (nothing is decoded).

Samples are the image files under ``src_dir`` (extension in :data:`~rsprune_data.images.IMAGE_EXTS`,
any case) in the order of their relative POSIX path as a string; shard ``i`` holds samples
``i * shard_size`` to ``(i + 1) * shard_size - 1``. Each sample has

- ``__key__``: the relative path without extension, with every ``.`` in the file stem replaced by
  ``_`` (webdataset splits key and extension at the first dot of the base name, so
  ``damage/-93.5_30.9.jpeg`` becomes ``damage/-93_5_30_9``). A key already taken, for example by
  ``a.b.jpg`` and ``a_b.jpg`` or by ``x.jpg`` and ``x.png``, gets the first free ``_1``, ``_2``, ...
  suffix in sample order, so keys are unique and the same on every run;
- the file's bytes under its lower-cased extension (``jpg``, ``jpeg``, ``png``, ``tif``, ``tiff``);
- ``cls.txt``: the first folder of the relative path (UTF-8), for files inside a sub-folder. Not
  ``cls``: webdataset's default decoders read ``cls`` as an integer and would fail on a name.

Files or folders whose name starts with ``.`` (``.git``, macOS ``._x.jpg``), unreadable or empty
files, and symbolic links that lead out of ``src_dir`` (unless ``follow_symlinks``) are skipped and
listed with their reason in :attr:`PackResult.skipped`. Tar metadata is fixed (mtime 0), so the same
folder packs to identical bytes. Members get one plain USTAR header each
(:class:`rsprune_data.tarwrite.TarOut`, the writer ``pack --from parquet`` uses too); webdataset's
``TarWriter`` gave every member a pax header for its float ``mtime``, 1 KiB more per member
(about 30% of the bytes of a 6.5 KB Harvey tile with its class file), which every reader, ours
included, then had to read and skip.

**Crash safety and resume.** Each shard is written under ``<name>.partial``, fsynced, renamed when
complete and its folder fsynced, so no partial shard ever has a final name. A small manifest,
``.<prefix>.pack.json`` in ``out_dir`` (written atomically after every shard), records the settings
and the source listing the shards were cut from; a rerun with the same settings on the same listing
after ``kill -9`` keeps the complete shards and continues from the first missing one (the result is
byte-identical to an uninterrupted run); a rerun of a finished pack does nothing. Shards of other
settings, or shards without a manifest, are replaced only with ``overwrite=True`` (``--overwrite``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from ._fsio import atomic_write_text, publish_file, remove_temporaries
from ._validate import check_int, check_output_dir
from .errors import ConfigError
from .images import IMAGE_EXTS

_PARTIAL = ".partial"
MANIFEST_FORMAT = "rsprune-pack"
MANIFEST_VERSION = 1
_FOLLOW = "pass --follow-symlinks (follow_symlinks=True) to pack what it points to"


@dataclass(frozen=True)
class PackResult:
    """What :func:`pack_folder` wrote.

    Attributes:
        shards: paths of the shards of the pack, in order (those kept by a resume included).
        num_samples: samples in those shards.
        skipped: ``(relative path, reason)`` of image files (or linked folders) left out.
        resumed_shards: complete shards of an interrupted run that were kept, not rewritten.
    """

    shards: list[Path]
    num_samples: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    resumed_shards: int = 0


def pack_folder(
    src_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    shard_size: int = 1000,
    prefix: str = "shard",
    progress: bool = True,
    overwrite: bool = False,
    follow_symlinks: bool = False,
) -> PackResult:
    """Write the images under ``src_dir`` to ``out_dir/{prefix}-000000.tar``, ... (module docstring).

    Args:
        src_dir: folder walked recursively.
        out_dir: folder for the shards; created if missing (its parent must exist).
        shard_size: samples per shard (the last shard may hold fewer).
        prefix: shard file name prefix.
        progress: show a tqdm progress bar.
        overwrite: replace shards named ``{prefix}-NNNNNN.tar`` already in ``out_dir`` that this
            call cannot resume (other settings or source files, or no manifest): they are deleted
            first, so no stale shard of an earlier, larger run survives. Also restarts a resumable
            pack from scratch.
        follow_symlinks: pack files that symbolic links lead to outside ``src_dir`` and follow
            linked folders (loops are cut); by default both are skipped with a reason.

    Returns:
        :class:`PackResult`.

    Raises:
        ConfigError: missing ``src_dir``, ``shard_size < 1``, bad ``prefix``, an ``out_dir`` that
            is a file, lacks its parent or is not writable, no images found, or existing shards
            that cannot be resumed without ``overwrite``.

    Example:
        >>> result = pack_folder("examples/data/ucmerced", "/tmp/uc", shard_size=50, progress=False,
        ...                      overwrite=True)
        >>> [p.name for p in result.shards], result.num_samples
        (['shard-000000.tar', 'shard-000001.tar', 'shard-000002.tar'], 105)
    """
    src, out = Path(src_dir), Path(out_dir)
    _check_args(src, shard_size, prefix)
    shard_size = int(shard_size)  # a numpy integer is fine, the manifest stores a plain int
    check_output_dir("out_dir", out)
    files, skipped = find_images(src, follow_symlinks=follow_symlinks)
    if not files:
        raise ConfigError(
            f"src_dir={str(src)!r} holds no image files ({', '.join(IMAGE_EXTS)}, any case); "
            "point it at the folder that contains the images"
        )
    out.mkdir(exist_ok=True)
    settings = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "src": os.path.realpath(src),
        "shard_size": shard_size,
        "prefix": prefix,
        "follow_symlinks": bool(follow_symlinks),
        "listing": _listing_digest(files),
    }
    manifest = _start(out, prefix, settings, overwrite)
    kept = len(manifest["shards"])
    if not manifest["complete"]:
        _write_shards(src, out, files, manifest, progress)
    shards = [out / e["name"] for e in manifest["shards"]]
    read_skips = [(str(r), str(w)) for r, w in manifest["skipped"]]
    return PackResult(
        shards=shards,
        num_samples=sum(int(e["samples"]) for e in manifest["shards"]),
        skipped=sorted(skipped + read_skips),
        resumed_shards=kept,
    )


def _shard_name(prefix: str, i: int) -> str:
    return f"{prefix}-{i:06d}.tar"


def _listing_digest(files: list[str]) -> str:
    return hashlib.sha256("\n".join(files).encode("utf-8", "surrogateescape")).hexdigest()[:32]


def _manifest_path(out: Path, prefix: str) -> Path:
    return out / f".{prefix}.pack.json"


def _save(out: Path, manifest: dict[str, Any]) -> None:
    atomic_write_text(
        _manifest_path(out, manifest["settings"]["prefix"]), json.dumps(manifest, indent=1) + "\n"
    )


def _start(out: Path, prefix: str, settings: dict[str, Any], overwrite: bool) -> dict[str, Any]:
    """The manifest to continue from: kept shards of a resumable run, or a fresh one.

    Deletes what an interrupted run left that cannot be kept (``.partial`` files, a shard renamed
    just before the kill but not yet in the manifest: it is rewritten identically).
    """
    pattern = re.compile(re.escape(prefix) + r"-\d{6}\.tar")
    remove_temporaries(_manifest_path(out, prefix))  # a kill during a manifest write
    for p in out.glob(f"{glob_escape(prefix)}-*.tar{_PARTIAL}"):
        p.unlink(missing_ok=True)
    old = sorted(p for p in out.iterdir() if pattern.fullmatch(p.name))
    path = _manifest_path(out, prefix)
    manifest: dict[str, Any] | None = None
    if path.is_file() and not overwrite:
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            manifest = None
    fresh = {"settings": settings, "shards": [], "skipped": [], "files_end": 0, "complete": False}
    if manifest is None or manifest.get("settings") != settings:
        if old and not overwrite:
            why = (
                "with other settings or source files"
                if manifest is not None
                else "by another run (no manifest)"
            )
            raise ConfigError(
                f"out_dir={str(out)!r} already holds {len(old)} shard(s) named {prefix}-NNNNNN.tar "
                f"(first: {old[0].name}) packed {why}; pass --overwrite (overwrite=True) to "
                "replace them, or choose another out_dir or prefix"
            )
        for p in old:
            p.unlink()
        _save(out, fresh)
        return fresh
    listed = {e["name"] for e in manifest["shards"]}
    for e in manifest["shards"]:
        shard = out / e["name"]
        size = shard.stat().st_size if shard.is_file() else None
        if size != e["size"]:
            raise ConfigError(
                f"shard {str(shard)!r} of an earlier pack is {'missing' if size is None else 'changed'}"
                " since pack wrote it; pass --overwrite (overwrite=True) to pack again"
            )
    for p in old:
        if p.name not in listed:
            p.unlink()
    return manifest


def glob_escape(text: str) -> str:
    """``text`` with glob wildcards escaped (``[`` -> ``[[]``)."""
    import glob

    return glob.escape(text)


def _write_shards(
    src: Path, out: Path, files: list[str], manifest: dict[str, Any], progress: bool
) -> None:
    from tqdm.auto import tqdm

    from .tario import scan_tar
    from .tarwrite import TarOut

    settings = manifest["settings"]
    shard_size, prefix = int(settings["shard_size"]), str(settings["prefix"])
    keys: set[str] = set()  # the keys of kept shards, so new keys stay unique as in one run
    for e in manifest["shards"]:
        keys.update(s.key for s in scan_tar(out / e["name"]))
    start = int(manifest["files_end"])
    f: BinaryIO | None = None
    writer: Any = None
    count = 0

    def publish(files_end: int) -> None:
        nonlocal f, writer, count
        assert f is not None and writer is not None
        writer.close()
        f.close()
        final = out / _shard_name(prefix, len(manifest["shards"]))
        publish_file(f.name, final)  # fsync the shard, rename, fsync the folder
        manifest["shards"].append(
            {"name": final.name, "size": final.stat().st_size, "samples": count}
        )
        manifest["files_end"] = files_end
        _save(out, manifest)
        f, writer, count = None, None, 0

    try:
        bar = tqdm(
            range(start, len(files)),
            desc=f"pack {src.name}",
            unit="img",
            disable=not progress,
            initial=start,
            total=len(files),
        )
        for j in bar:
            rel = files[j]
            try:
                data = (src / rel).read_bytes()
            except OSError as exc:
                manifest["skipped"].append([rel, f"unreadable: {exc.strerror or exc}"])
                continue
            if not data:
                manifest["skipped"].append([rel, "empty file"])
                continue
            if writer is None:  # opened lazily: no empty shard when every file is skipped
                partial = out / (_shard_name(prefix, len(manifest["shards"])) + _PARTIAL)
                f = open(partial, "wb")  # noqa: SIM115 (closed by publish or below)
                writer = TarOut(f)  # plain USTAR headers: no pax header per member
            writer.write(pack_sample(rel, data, keys))
            count += 1
            if count == shard_size:
                publish(j + 1)
        if writer is not None:
            publish(len(files))
    except BaseException:
        if f is not None:  # close the open shard without publishing it
            name = f.name
            with contextlib.suppress(Exception):
                writer.close()
            f.close()
            Path(name).unlink(missing_ok=True)
        raise
    manifest["files_end"] = len(files)
    manifest["complete"] = True
    _save(out, manifest)


def _check_args(src: Path, shard_size: int, prefix: str) -> None:
    if not src.is_dir():
        raise ConfigError(
            f"src_dir={str(src)!r} is not an existing folder; pass the folder of images"
        )
    check_int("shard_size", shard_size, 1)
    check_prefix(prefix)


def check_prefix(prefix: str) -> None:
    """Refuse a shard name prefix that is empty, hidden or a path (shared with ``pack_table``)."""
    if not prefix or "/" in prefix or os.sep in prefix or prefix.startswith("."):
        raise ConfigError(
            f"prefix must be a plain, non-hidden file name part without '/', got {prefix!r}; "
            "for another folder change out_dir instead"
        )


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def find_images(
    src: Path, *, follow_symlinks: bool = False
) -> tuple[list[str], list[tuple[str, str]]]:
    """Relative POSIX paths of the image files, sorted as strings, and ``(path, reason)`` of those
    left out: hidden ones, and (unless ``follow_symlinks``) links that lead out of ``src`` and
    linked folders, which are not walked."""
    found: list[str] = []
    skipped: list[tuple[str, str]] = []
    root_real = os.path.realpath(src)
    seen = {root_real}  # real folders walked, so a link back up cannot loop
    for root, dirs, names in os.walk(src, followlinks=follow_symlinks):
        for d in list(dirs):
            full = os.path.join(root, d)
            if not os.path.islink(full):
                continue
            real = os.path.realpath(full)
            if follow_symlinks and real not in seen and os.path.isdir(real):
                seen.add(real)
                continue
            dirs.remove(d)
            why = (
                "linked folder already walked (a loop or a second link)"
                if follow_symlinks
                else f"symbolic link to the folder {real}, not followed: {_FOLLOW}"
            )
            skipped.append((Path(full).relative_to(src).as_posix() + "/", why))
        for name in names:
            if name.rsplit(".", 1)[-1].lower() in IMAGE_EXTS and "." in name:
                full = os.path.join(root, name)
                rel = Path(full).relative_to(src).as_posix()
                real = os.path.realpath(full)
                if any(part.startswith(".") for part in rel.split("/")):
                    skipped.append((rel, "hidden file or folder"))
                elif not follow_symlinks and not _inside(real, root_real):
                    skipped.append(
                        (rel, f"symbolic link to {real}, outside the source folder: {_FOLLOW}")
                    )
                else:
                    found.append(rel)
    skipped.sort()
    return sorted(found), skipped


def pack_sample(rel: str, data: bytes, keys: set[str]) -> dict[str, object]:
    """One webdataset sample: unique dot-free key, bytes under the lower-cased ext, folder class."""
    parent, _, name = rel.rpartition("/")
    stem, _, ext = name.rpartition(".")
    stem = stem.replace(".", "_") or "_"
    base = f"{parent}/{stem}" if parent else stem
    key, n = base, 0
    while key in keys:
        n += 1
        key = f"{base}_{n}"
    keys.add(key)
    sample: dict[str, object] = {"__key__": key, ext.lower(): data}
    if parent:
        sample["cls.txt"] = parent.split("/", 1)[0].encode("utf-8")
    return sample
