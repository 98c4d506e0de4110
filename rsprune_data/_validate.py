"""Argument checks shared by the config and the core, with messages that name the fix."""

from __future__ import annotations

import math
from typing import Any

from .errors import ConfigError


def check_int(name: str, value: Any, minimum: int) -> int:
    """``int(value)`` if it is an integer (numpy ones included, bools not) >= ``minimum``.

    Example:
        >>> check_int("seed", 3, 0)
        3
    """
    import numpy as np

    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ConfigError(f"`{name}` must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_number(name: str, value: Any, lo: float, hi: float, *, lo_open: bool = False,
                 hi_open: bool = False) -> float:
    """``float(value)`` if it is a finite number in the interval, else :class:`ConfigError`.

    Example:
        >>> check_number("prune_ratio", 0.85, 0.0, 1.0, hi_open=True)
        0.85
    """
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"`{name}` must be a finite number, got {value!r}")
    too_low = value <= lo if lo_open else value < lo
    too_high = value >= hi if hi_open else value > hi
    if too_low or too_high:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise ConfigError(f"`{name}` must be in {interval}, got {value!r}")
    return float(value)
