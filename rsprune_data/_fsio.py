"""File-system mechanics with one home: atomic writes of files and folders, exact positional reads.

Atomic means a reader (or a rerun after ``kill -9`` or a power loss) sees either the old complete
result or the new complete one, never a mix: the bytes go to a temporary sibling in the same folder
(``os.replace`` is atomic only within one file system), the file is fsynced, renamed over the final
name, and the folder is fsynced so that the rename itself is durable.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

_PathLike = str | os.PathLike[str]


def fsync_dir(path: _PathLike) -> None:
    """fsync a folder so that renames and new entries in it survive a crash (a no-op on Windows)."""
    if os.name == "nt":  # folders cannot be opened for fsync there
        return
    fd = os.open(os.fspath(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: _PathLike) -> None:
    """fsync one file's data (for a file written by a library that does not fsync itself)."""
    fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_sibling(path: _PathLike, tag: str = "tmp") -> Path:
    """A hidden temporary name next to ``path``, unique per process: ``.NAME.PID.TAG``."""
    p = Path(path)
    return p.with_name(f".{p.name}.{os.getpid()}.{tag}")


def publish_file(tmp: _PathLike, path: _PathLike) -> None:
    """fsync ``tmp``, rename it to ``path`` and fsync the folder (``tmp`` must be a sibling)."""
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def atomic_write_bytes(path: _PathLike, data: bytes | bytearray | memoryview) -> None:
    """Write ``data`` to ``path`` atomically (temporary sibling, fsync, rename, fsync folder).

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "x.txt"
        >>> atomic_write_bytes(p, b"hello"); p.read_bytes()
        b'hello'
    """
    atomic_write_with(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: _PathLike, text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` in UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_with(path: _PathLike, write: Callable[[Path], object]) -> None:
    """Let ``write(tmp)`` create a temporary sibling of ``path`` (a library's own ``save_file``),
    then publish it atomically; the temporary file is removed when ``write`` fails."""
    tmp = temp_sibling(path)
    try:
        write(tmp)
        publish_file(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_temporaries(path: _PathLike) -> list[Path]:
    """Delete what killed atomic writes of ``path`` left (``.NAME.*.tmp`` files or folders)."""
    p = Path(path)
    gone = []
    for tmp in p.parent.glob(f".{p.name}.*.tmp"):
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        gone.append(tmp)
    return gone


def _fsync_tree(root: Path) -> None:
    for folder, _dirs, files in os.walk(root):
        for name in files:
            fsync_file(Path(folder, name))
        fsync_dir(folder)


@contextlib.contextmanager
def atomic_folder(path: _PathLike) -> Iterator[Path]:
    """Build a folder under a temporary sibling and publish it as ``path`` only when complete.

    The body writes into the yielded folder. On success every file is fsynced, an existing ``path``
    is moved aside, the new folder renamed into place, the old one deleted and the parent fsynced.
    On an exception (or ``kill -9``) ``path`` keeps its earlier complete content; the temporary
    folder is removed (after a kill, :func:`remove_temporaries` on the next run removes it).

    The swap of a non-empty folder takes two renames (POSIX has no atomic exchange of folders): a
    kill between them leaves ``path`` missing and the old report under ``.NAME.PID.old.tmp``, never
    a mix of two reports.

    Example:
        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "report"
        >>> with atomic_folder(out) as tmp:
        ...     _ = (tmp / "a.txt").write_text("1")
        >>> sorted(p.name for p in out.iterdir())
        ['a.txt']
    """
    final = Path(path)
    remove_temporaries(final)
    tmp = temp_sibling(final)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        old = temp_sibling(final, "old.tmp")
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        if old.is_symlink():  # the target was a link to a folder: drop the link, not its folder
            old.unlink()
        elif old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def pread_exact(fd: int, length: int, offset: int) -> bytes:
    """Read ``length`` bytes at ``offset`` from a file descriptor, looping over short reads.

    Returns fewer bytes only at the end of the file (the caller decides whether that is an error).
    Uses ``os.pread`` (no shared file position, so threads and forked workers may share ``fd``);
    where it does not exist (Windows) falls back to seek + read.

    Example:
        >>> import os, tempfile
        >>> fd, name = tempfile.mkstemp(); _ = os.write(fd, b"0123456789")
        >>> pread_exact(fd, 3, 4), pread_exact(fd, 5, 8)
        (b'456', b'89')
    """
    parts: list[bytes] = []
    while length > 0:
        if hasattr(os, "pread"):
            chunk = os.pread(fd, length, offset)
        else:  # pragma: no cover - Windows
            os.lseek(fd, offset, os.SEEK_SET)
            chunk = os.read(fd, length)
        if not chunk:
            break
        parts.append(chunk)
        length -= len(chunk)
        offset += len(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)
