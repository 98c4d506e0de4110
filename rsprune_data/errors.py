"""Exception hierarchy: one base class, each subclass also inherits the matching builtin.

Every message names the argument or file, shows the value and says what to do, for example
``prune_ratio must be in [0, 1), got 1.2``.
"""

from __future__ import annotations


class RsPruneError(Exception):
    """Base class of every error raised on purpose by rsprune_data."""


class ConfigError(RsPruneError, ValueError):
    """A pruning setting or function argument is out of its allowed range."""


class DependencyNotFoundError(RsPruneError, ImportError):
    """An optional dependency is missing; the message names the pip extra that installs it."""


class CorruptImageError(RsPruneError, ValueError):
    """An image could not be decoded. ``reason`` is a short code counted in reports."""

    def __init__(self, message: str, reason: str = "decode_error") -> None:
        super().__init__(message)
        self.reason = reason


class ShardError(RsPruneError, OSError):
    """A tar shard is truncated, garbage or unreadable."""


class ShardNotFoundError(ShardError, FileNotFoundError):
    """A shard file does not exist where its index says it is."""


class IndexNotFoundError(RsPruneError, FileNotFoundError):
    """No index file exists for a shard."""


class StaleIndexError(RsPruneError, ValueError):
    """An index no longer matches its shard (the shard changed since indexing)."""


class IndexMismatchError(RsPruneError, ValueError):
    """Indexes that must agree (centroids, encoder, K, format version) do not."""


class EncoderLoadError(RsPruneError, OSError):
    """An encoder or its weights could not be loaded (for example no network for a hub name)."""


class StateDictError(RsPruneError, ValueError):
    """A sampler/dataset state was taken on a different index or configuration."""
