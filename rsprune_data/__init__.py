"""rsprune_data: RS-Prune data pruning as a PyTorch data-loading plugin.

Index once (entropy, reference-cluster assignment, byte ranges per WebDataset shard), then choose any
pruning ratio at load time with :class:`PrunedSampler` or :class:`PrunedWebDataset`. Importing the
package is cheap: torch-facing classes load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__ as __version__
from .config import PruneConfig
from .errors import (
    ConfigError,
    CorruptImageError,
    DeliveryError,
    DependencyNotFoundError,
    EncoderLoadError,
    IndexCorruptError,
    IndexMismatchError,
    IndexNotFoundError,
    RsPruneError,
    ShardError,
    StaleIndexError,
    StateDictError,
)
from .plan import auto_entropy_threshold, select_with_config, selection_summary
from .selection import STRATEGIES, budget, select_indices

# name -> module, imported on first attribute access (PEP 562) so `import rsprune_data` stays light.
_LAZY = {
    "PruneIndex": "index",
    "PrunedSampler": "sampler",
    "PrunedShardDataset": "datasets",
    "PrunedImageFolder": "datasets",
    "PrunedWebDataset": "wds",
}

if TYPE_CHECKING:
    from .datasets import PrunedImageFolder, PrunedShardDataset
    from .index import PruneIndex
    from .sampler import PrunedSampler
    from .wds import PrunedWebDataset


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'rsprune_data' has no attribute {name!r}")


__all__ = [
    "ConfigError",
    "CorruptImageError",
    "DeliveryError",
    "DependencyNotFoundError",
    "EncoderLoadError",
    "IndexCorruptError",
    "IndexMismatchError",
    "IndexNotFoundError",
    "PruneConfig",
    "PruneIndex",
    "PrunedImageFolder",
    "PrunedSampler",
    "PrunedShardDataset",
    "PrunedWebDataset",
    "RsPruneError",
    "STRATEGIES",
    "ShardError",
    "StaleIndexError",
    "StateDictError",
    "auto_entropy_threshold",
    "budget",
    "select_indices",
    "select_with_config",
    "selection_summary",
]
