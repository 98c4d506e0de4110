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

Files or folders whose name starts with ``.`` (``.git``, macOS ``._x.jpg``) and unreadable or
empty files are skipped and listed in :attr:`PackResult.skipped`. Each shard is written under
``<name>.partial`` and renamed when complete, so an interrupted run never leaves a partial shard
under a final name. Tar metadata is fixed (mtime 0), so the same folder packs to identical bytes.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError
from .images import IMAGE_EXTS

_PARTIAL = ".partial"


@dataclass(frozen=True)
class PackResult:
    """What :func:`pack_folder` wrote.

    Attributes:
        shards: paths of the shards written, in order.
        num_samples: samples written in total.
        skipped: ``(relative path, reason)`` of image files left out.
    """

    shards: list[Path]
    num_samples: int
    skipped: list[tuple[str, str]] = field(default_factory=list)


def pack_folder(
    src_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    shard_size: int = 1000,
    prefix: str = "shard",
    progress: bool = True,
    overwrite: bool = False,
) -> PackResult:
    """Write the images under ``src_dir`` to ``out_dir/{prefix}-000000.tar``, ... (module docstring).

    Args:
        src_dir: folder walked recursively (symbolic links to folders are not followed).
        out_dir: folder for the shards, created if missing.
        shard_size: samples per shard (the last shard may hold fewer).
        prefix: shard file name prefix.
        progress: show a tqdm progress bar.
        overwrite: allow replacing shards named ``{prefix}-NNNNNN.tar`` already in ``out_dir``
            (they are deleted first, so no stale shard of an earlier, larger run survives).

    Returns:
        :class:`PackResult`.

    Raises:
        ConfigError: missing ``src_dir``, ``shard_size < 1``, bad ``prefix``, no images found, or
            existing shards without ``overwrite``.

    Example:
        >>> result = pack_folder("examples/data/ucmerced", "/tmp/uc", shard_size=50, progress=False,
        ...                      overwrite=True)
        >>> [p.name for p in result.shards], result.num_samples
        (['shard-000000.tar', 'shard-000001.tar', 'shard-000002.tar'], 105)
    """
    src, out = Path(src_dir), Path(out_dir)
    _check_args(src, shard_size, prefix)
    files, skipped = find_images(src)
    if not files:
        raise ConfigError(
            f"src_dir={str(src)!r} holds no image files ({', '.join(IMAGE_EXTS)}, any case); "
            "point it at the folder that contains the images"
        )
    out.mkdir(parents=True, exist_ok=True)
    _clear_old_shards(out, prefix, overwrite)

    import webdataset as wds
    from tqdm.auto import tqdm

    shards: list[Path] = []

    def publish(partial: str) -> None:
        final = Path(partial[: -len(_PARTIAL)])
        os.replace(partial, final)
        shards.append(final)

    pattern = str(out / prefix).replace("%", "%%") + "-%06d.tar" + _PARTIAL
    writer: wds.ShardWriter | None = None
    written = 0
    keys: set[str] = set()
    try:
        for rel in tqdm(files, desc=f"pack {src.name}", unit="img", disable=not progress):
            try:
                data = (src / rel).read_bytes()
            except OSError as exc:
                skipped.append((rel, f"unreadable: {exc.strerror or exc}"))
                continue
            if not data:
                skipped.append((rel, "empty file"))
                continue
            if writer is None:  # created lazily: no empty shard when every file is skipped
                writer = wds.ShardWriter(
                    pattern, maxcount=shard_size, maxsize=float("inf"), post=publish, verbose=0,
                    encoder=False, mtime=0.0,
                )
            writer.write(pack_sample(rel, data, keys))
            written += 1
    except BaseException:
        if writer is not None:  # close the open shard without publishing it
            writer.post = None
            partial = writer.fname
            writer.close()
            if partial is not None:
                Path(partial).unlink(missing_ok=True)
        raise
    if writer is not None:
        writer.close()
    return PackResult(shards=shards, num_samples=written, skipped=skipped)


def _check_args(src: Path, shard_size: int, prefix: str) -> None:
    if not src.is_dir():
        raise ConfigError(f"src_dir={str(src)!r} is not an existing folder; pass the folder of images")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ConfigError(f"shard_size must be an integer >= 1 (samples per shard), got {shard_size!r}")
    check_prefix(prefix)


def check_prefix(prefix: str) -> None:
    """Refuse a shard name prefix that is empty, hidden or a path (shared with ``pack_table``)."""
    if not prefix or "/" in prefix or os.sep in prefix or prefix.startswith("."):
        raise ConfigError(
            f"prefix must be a plain, non-hidden file name part without '/', got {prefix!r}; "
            "for another folder change out_dir instead"
        )


def find_images(src: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Relative POSIX paths of the image files, sorted as strings, and hidden ones to skip."""
    found: list[str] = []
    skipped: list[tuple[str, str]] = []
    for root, _dirs, names in os.walk(src):
        for name in names:
            if name.rsplit(".", 1)[-1].lower() in IMAGE_EXTS and "." in name:
                rel = Path(root, name).relative_to(src).as_posix()
                if any(part.startswith(".") for part in rel.split("/")):
                    skipped.append((rel, "hidden file or folder"))
                else:
                    found.append(rel)
    skipped.sort()
    return sorted(found), skipped


def _clear_old_shards(out: Path, prefix: str, overwrite: bool) -> None:
    pattern = re.compile(re.escape(prefix) + r"-\d{6}\.tar")
    old = sorted(p for p in out.iterdir() if pattern.fullmatch(p.name))
    if old and not overwrite:
        raise ConfigError(
            f"out_dir={str(out)!r} already holds {len(old)} shard(s) named {prefix}-NNNNNN.tar "
            f"(first: {old[0].name}); pass overwrite=True, or choose another out_dir or prefix"
        )
    for p in old:
        p.unlink()


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
