"""Argument checks shared by every layer, with messages that name the argument, value and fix.

Numbers may be Python or numpy scalars (``np.float32(0.5)``, ``np.int64(3)``: what indexing an array
gives); bools are never numbers here (``True`` as a ratio or a count is a mistake, not a 1).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError


def is_int(value: Any) -> bool:
    """An integer, Python or numpy, that is not a bool."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def is_number(value: Any) -> bool:
    """A real number, Python or numpy (ints and floats), that is not a bool."""
    return is_int(value) or isinstance(value, float | np.floating)


def check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    """``int(value)`` if it is an integer (numpy ones included, bools not) in
    ``[minimum, maximum]``.

    Example:
        >>> check_int("seed", 3, 0)
        3
    """
    if not is_int(value) or value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ConfigError(f"`{name}` must be an integer {bound}, got {value!r}")
    return int(value)


def check_number(
    name: str, value: Any, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False
) -> float:
    """``float(value)`` if it is a finite number in the interval, else :class:`ConfigError`.

    Example:
        >>> check_number("prune_ratio", 0.85, 0.0, 1.0, hi_open=True)
        0.85
        >>> check_number("prune_ratio", np.float32(0.5), 0.0, 1.0, hi_open=True)
        0.5
    """
    if not is_number(value) or not math.isfinite(value):
        raise ConfigError(f"`{name}` must be a finite number, got {value!r}")
    too_low = value <= lo if lo_open else value < lo
    too_high = value >= hi if hi_open else value > hi
    if too_low or too_high:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise ConfigError(f"`{name}` must be in {interval}, got {value!r}")
    return as_float(value)


def as_float(value: Any) -> float:
    """``float(value)``; a float16/float32 scalar goes through its shortest decimal form, so
    ``np.float32(0.85)`` is the 0.85 it was written as, not 0.8500000238 (the same config, budget
    and cache key as the Python float)."""
    if isinstance(value, np.floating) and value.dtype.itemsize < 8:
        return float(str(value))
    return float(value)


def check_choice(name: str, value: Any, choices: Any) -> Any:
    """``value`` if it is one of ``choices``, else an error listing ``sorted(choices)``."""
    if value not in choices:
        raise ConfigError(f"`{name}` must be one of {sorted(choices)}, got {value!r}")
    return value


def _writable_dir(name: str, value: Any, folder: Path, what: str) -> None:
    if not folder.is_dir():
        raise ConfigError(
            f"`{name}`={os.fspath(value)!r}: {what} {str(folder)!r} is not an "
            "existing folder; create it first or choose another path"
        )
    # A probe file, not os.access: root passes access() on a chmod-ed folder, and only a real
    # create sees a read-only mount, a full quota or an ACL.
    import tempfile

    try:
        fd, probe = tempfile.mkstemp(prefix=".rsprune-probe-", dir=folder)
    except OSError as exc:
        raise ConfigError(
            f"`{name}`={os.fspath(value)!r}: cannot write into {str(folder)!r} "
            f"({exc.strerror or exc}); choose a writable path"
        ) from None
    os.close(fd)
    os.unlink(probe)


def check_output_file(name: str, value: str | os.PathLike[str]) -> Path:
    """A path a file can be written to, checked before any work: not a folder, in an existing,
    writable folder, and not a read-only existing file.

    Example:
        >>> check_output_file("-o", "/missing/dir/keys.txt")
        Traceback (most recent call last):
        ...
        rsprune_data.errors.ConfigError: `-o`='/missing/dir/keys.txt': its folder '/missing/dir' is not an existing folder; create it first or choose another path
    """
    path = Path(value)
    if path.is_dir():
        raise ConfigError(
            f"`{name}`={os.fspath(value)!r} is a folder, a file path is needed "
            "here (for example add a file name)"
        )
    _writable_dir(name, value, path.parent if str(path.parent) else Path("."), "its folder")
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(
            f"`{name}`={os.fspath(value)!r} exists and is read-only; choose "
            "another path or make it writable"
        )
    return path


def check_output_dir(name: str, value: str | os.PathLike[str]) -> Path:
    """A folder that output can go to, checked before any work: an existing writable folder, or
    a missing one whose parent exists and is writable (it is created later). Not a file."""
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise ConfigError(
            f"`{name}`={os.fspath(value)!r} is a file, a folder is needed here; "
            "remove it or choose another path"
        )
    if path.is_dir():
        _writable_dir(name, value, path, "the folder")
    else:
        _writable_dir(
            name, value, path.parent if str(path.parent) else Path("."), "its parent folder"
        )
    return path


def check_rgb_bands(value: Any) -> tuple[int, int, int]:
    """Three band indices >= 0 (R, G, B of multi-band GeoTIFFs), as a tuple of ints.

    Checked where the work is set up, not in a decoding worker, so a typo fails at once.
    Whether the bands exist is known only per image (an image with fewer bands is invalid).
    """
    bands = tuple(value) if isinstance(value, list | tuple) else ()
    if len(bands) != 3 or not all(is_int(b) and b >= 0 for b in bands):
        raise ConfigError(
            f"`rgb_bands` must be 3 band indices >= 0 (R G B, 0-based), got {value!r}"
        )
    return int(bands[0]), int(bands[1]), int(bands[2])
