"""`PruneConfig`: the pruning settings, frozen and validated.

One object carries everything that decides a selection, so it can be logged, compared, saved with a
checkpoint (``to_dict``) and restored (``from_dict``). Invalid values raise :class:`ConfigError`
naming the field, the value and the allowed range.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

from ._validate import as_float, check_int, check_number, is_number
from .errors import ConfigError
from .filters import check_where

#: Default for :attr:`PruneConfig.max_nodata`: a sample whose no-data share exceeds this fraction is
#: dropped in Stage I (an extension of the paper's Stage I, see ``max_nodata``).
DEFAULT_MAX_NODATA = 0.05

#: Values of :attr:`PruneConfig.entropy_filter`.
ENTROPY_FILTERS = ("auto", "none")


#: A schedule: epoch -> the config of that epoch, or just its pruning ratio.
Schedule = Callable[[int], "PruneConfig | float"]


def as_config(value: Any, what: str) -> PruneConfig:
    """``value`` as a :class:`PruneConfig`: a config as is, a ratio ``r`` as ``PruneConfig(prune_ratio=r)``.

    ``what`` names the argument in the error message.
    """
    if isinstance(value, PruneConfig):
        return value
    if not is_number(value):
        raise ConfigError(
            f"`{what}` must be a PruneConfig or a pruning ratio in [0, 1), got {value!r}"
        )
    return PruneConfig(prune_ratio=as_float(value))


@dataclass(frozen=True)
class PruneConfig:
    """Settings of one selection.

    Args:
        prune_ratio: share of the dataset to drop, in [0, 1). The budget is
            ``B = floor((1 - prune_ratio) * N + 0.5)`` samples of the whole index (N samples).
        entropy_keep: Stage I by fraction: keep the ``entropy_keep`` share of the dataset with the
            highest entropy, in (0, 1]. Exclusive with ``entropy_threshold``.
        entropy_threshold: Stage I by threshold: keep samples with entropy >= this many bits, in [0, 8].
        entropy_filter: what Stage I does when neither ``entropy_keep`` nor ``entropy_threshold`` is
            given: ``"auto"`` (default) chooses the cut from the pool's own entropy distribution (see
            :func:`rsprune_data.selection.auto_entropy_threshold`), ``"none"`` keeps every valid sample.
        strategy: name in :data:`rsprune_data.selection.STRATEGIES` (``"rsprune"`` is the method).
        seed: seed of the seeded strategies (``"random"``); ignored by the deterministic ones.
        max_nodata: drop samples whose no-data share exceeds this fraction in Stage I, in [0, 1], or
            ``None`` to disable. An extension of the paper's Stage I: swath-edge wedges of no-data
            barely move global entropy, so the entropy filter alone keeps them.
        where: metadata filters, ``(column, operator, number)`` triples ANDed, e.g.
            ``[("cloud_cover", "<=", 0.1), ("gsd", "<", 1.0)]`` over the index's optional columns
            (:mod:`rsprune_data.filters`: operators, name resolution, missing values). An extension
            applied as eligibility before Stage I, with every strategy (it defines the pool);
            an unknown operator fails here, an unknown column when the config meets an index.
        max_cloud: drop samples whose pixel cloud/haze score (``score.cloud``, see
            :func:`rsprune_data.images.cloud_score`) exceeds this value in Stage I, in [0, 1], or
            ``None`` (default: off, see the README's measured trade-off). An extension like
            ``max_nodata``; samples without the score (indexed before it existed) are kept.
        dedup_threshold: opt-in near-duplicate removal (an extension, SemDeDup-style): a cosine
            ``tau`` in (0, 1]; within each reference cluster a sample whose cosine to a kept, more
            central sample is ``>= tau`` is dropped after Stage I, before Stage II
            (:mod:`rsprune_data.dedup`). Needs stored embeddings (``index --store-embeddings``).

    Example:
        >>> cfg = PruneConfig(prune_ratio=0.85, entropy_keep=0.3, where=[("gsd", "<", 1.0)])
        >>> PruneConfig.from_dict(cfg.to_dict()) == cfg
        True
        >>> cfg.where
        (('gsd', '<', 1.0),)
    """

    prune_ratio: float
    entropy_keep: float | None = None
    entropy_threshold: float | None = None
    entropy_filter: str = "auto"
    strategy: str = "rsprune"
    seed: int = 0
    max_nodata: float | None = DEFAULT_MAX_NODATA
    where: tuple[tuple[str, str, float], ...] = ()
    max_cloud: float | None = None
    dedup_threshold: float | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "where", check_where(self.where))
        if self.max_cloud is not None:
            set_(self, "max_cloud", check_number("max_cloud", self.max_cloud, 0.0, 1.0))
        set_(
            self,
            "prune_ratio",
            check_number("prune_ratio", self.prune_ratio, 0.0, 1.0, hi_open=True),
        )
        if self.entropy_keep is not None and self.entropy_threshold is not None:
            raise ConfigError(
                "`entropy_keep` and `entropy_threshold` are exclusive, got "
                f"entropy_keep={self.entropy_keep!r} and entropy_threshold={self.entropy_threshold!r}: "
                "pass only one"
            )
        if self.entropy_keep is not None:
            set_(
                self,
                "entropy_keep",
                check_number("entropy_keep", self.entropy_keep, 0.0, 1.0, lo_open=True),
            )
        if self.entropy_threshold is not None:
            set_(
                self,
                "entropy_threshold",
                check_number("entropy_threshold", self.entropy_threshold, 0.0, 8.0),
            )
        if self.entropy_filter not in ENTROPY_FILTERS:
            raise ConfigError(
                f"`entropy_filter` must be one of {list(ENTROPY_FILTERS)}, got {self.entropy_filter!r}"
            )
        from .selection import STRATEGIES  # selection imports config: resolve at call time

        if self.strategy not in STRATEGIES:
            raise ConfigError(
                f"`strategy` must be one of {sorted(STRATEGIES)}, got {self.strategy!r}"
            )
        set_(self, "seed", check_int("seed", self.seed, 0))
        if self.max_nodata is not None:
            set_(self, "max_nodata", check_number("max_nodata", self.max_nodata, 0.0, 1.0))
        if self.dedup_threshold is not None:
            set_(
                self,
                "dedup_threshold",
                check_number("dedup_threshold", self.dedup_threshold, 0.0, 1.0, lo_open=True),
            )

    def replace(self, **changes: Any) -> PruneConfig:
        """A copy with ``changes`` applied (validated again)."""
        return PruneConfig(**{**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form; ``PruneConfig.from_dict(c.to_dict()) == c``."""
        out = asdict(self)
        out["where"] = [list(c) for c in self.where]  # JSON has no tuples; from_dict restores them
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruneConfig:
        """Build from :meth:`to_dict` output; unknown keys raise :class:`ConfigError`."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"unknown PruneConfig field(s) {unknown}; allowed fields are {sorted(known)}"
            )
        if "prune_ratio" not in data:
            raise ConfigError("`prune_ratio` is required, got a dict without it")
        return cls(**data)
