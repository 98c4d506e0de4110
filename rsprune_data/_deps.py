"""Lazy imports of optional dependencies with an error that names the pip extra."""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import DependencyNotFoundError

# module name -> (pip extra, distribution name)
_EXTRAS: dict[str, tuple[str, str]] = {
    "open_clip": ("clip", "open_clip_torch"),
    "transformers": ("hf", "transformers"),
    "torchdata": ("resume", "torchdata"),
    "skimage": ("bench", "scikit-image"),
    "scipy": ("bench", "scipy"),
    "pyarrow": ("parquet", "pyarrow"),
    "accelerate": ("accelerate", "accelerate"),
    "lightning": ("lightning", "lightning"),
}


def lazy_import(name: str) -> ModuleType:
    """Import ``name`` or raise :class:`DependencyNotFoundError` with the install line.

    Example:
        >>> np = lazy_import("numpy")
    """
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        top = name.split(".")[0]
        extra, dist = _EXTRAS.get(top, ("all", top))
        raise DependencyNotFoundError(
            f"{name} is not installed; it is needed for this feature. Install it with "
            f"`pip install 'rsprune-data[{extra}]'` (or `pip install {dist}`)."
        ) from exc
