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


class IndexCorruptError(RsPruneError, ValueError):
    """An index file is damaged or malformed: wrong schema, dtype, length, metadata or a value out
    of range. The message names the file, the field and the fix (index the shard again);
    ``field`` and ``problem`` hold the field's name and what is wrong with it."""

    def __init__(self, message: str, field: str = "", problem: str = "") -> None:
        super().__init__(message)
        self.field, self.problem = field, problem

    def __reduce__(self) -> tuple[type, tuple[str, str, str]]:  # picklable across processes
        return (type(self), (str(self), self.field, self.problem))


class ChecksumError(StaleIndexError):
    """A sample's bytes differ from those that were indexed (its per-sample checksum)."""


class OverwriteError(RsPruneError, FileExistsError):
    """A run would replace existing work (an index of another kind) without ``overwrite``."""


class IndexMismatchError(RsPruneError, ValueError):
    """Indexes that must agree (centroids, encoder, K, format version) do not."""


class EncoderLoadError(RsPruneError, OSError):
    """An encoder or its weights could not be loaded (for example no network for a hub name)."""


class StateDictError(RsPruneError, ValueError):
    """A sampler/dataset state is malformed (the message names the field) or was taken on a
    different index, configuration, rank or world size."""


class DeliveryError(RsPruneError, RuntimeError):
    """A pass delivered another number of batches than its plan (a wrapper changed the stream)."""
