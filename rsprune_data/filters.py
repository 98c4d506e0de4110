"""Metadata filters of :attr:`PruneConfig.where`: ``(column, operator, value)`` clauses (numpy only).

A clause keeps the samples whose value in an optional index column (:mod:`rsprune_data.columns`)
compares true against a number: ``("cloud_cover", "<=", 0.1)`` keeps tiles with at most 10% cloud
cover. Clauses are ANDed. A missing value (NaN: the sample's ``.json`` had no such field, or its
shard was indexed without the column) never passes a clause, not even ``!=``: a filter states what
a kept sample is known to satisfy.

Column names: a full index column name (``meta.gsd``, ``score.cloud``) or a bare field name that
resolves to ``meta.<name>`` or ``score.<name>`` (an error if both exist). The config layer applies the
clauses as Stage I eligibility, before the entropy rule, and counts what each one drops.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .errors import ConfigError

#: A validated clause: (column name as written, operator, number).
Clause = tuple[str, str, float]

OPERATORS: dict[str, Callable[[Any, Any], Any]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
}
COLUMN_PREFIXES = ("meta.", "score.")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_TEXT = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_.\-]*)\s*(<=|>=|==|!=|<|>)\s*(\S+)\s*")


def check_clause(clause: Any, where: str = "where") -> Clause:
    """``clause`` as a validated ``(column, op, float)`` triple.

    Example:
        >>> check_clause(["cloud_cover", "<=", 0.1])
        ('cloud_cover', '<=', 0.1)
    """
    if isinstance(clause, str) or not isinstance(clause, Sequence) or len(clause) != 3:
        raise ConfigError(
            f"`{where}` entries must be (column, operator, number) triples such as "
            f"('cloud_cover', '<=', 0.1), got {clause!r}"
        )
    col, op, value = clause
    if not isinstance(col, str) or not _NAME.fullmatch(col):
        raise ConfigError(
            f"`{where}` column must be a field name such as 'cloud_cover' or "
            f"'score.cloud', got {col!r}"
        )
    if op not in OPERATORS:
        raise ConfigError(
            f"`{where}` operator must be one of {sorted(OPERATORS)}, got {op!r} "
            f"in {tuple(clause)!r}"
        )
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float | np.integer | np.floating)
        or not math.isfinite(float(value))
    ):
        raise ConfigError(
            f"`{where}` value must be a finite number, got {value!r} in {tuple(clause)!r}"
        )
    return (col, str(op), float(value))


def check_where(where: Any) -> tuple[Clause, ...]:
    """A validated tuple of clauses (lists from JSON become tuples, so configs stay hashable)."""
    if where is None:
        return ()
    if isinstance(where, str) or not isinstance(where, Sequence):
        raise ConfigError(
            "`where` must be a list of (column, operator, number) triples such as "
            f"[('cloud_cover', '<=', 0.1)], got {where!r}"
        )
    return tuple(check_clause(c) for c in where)


def parse_clause(text: str) -> Clause:
    """A clause from its command-line form ``COLUMN OP NUMBER`` (``"cloud_cover<=0.1"``).

    Example:
        >>> parse_clause("gsd < 1")
        ('gsd', '<', 1.0)
    """
    m = _TEXT.fullmatch(text)
    if m is None:
        raise ConfigError(
            f"--where {text!r} is not COLUMN OP NUMBER with OP one of "
            f"{sorted(OPERATORS)}, e.g. --where 'cloud_cover<=0.1'"
        )
    try:
        value = float(m.group(3))
    except ValueError:
        raise ConfigError(f"--where {text!r}: {m.group(3)!r} is not a number") from None
    return check_clause((m.group(1), m.group(2), value), "--where")


def resolve_column(name: str, available: Sequence[str]) -> str:
    """The index column ``name`` refers to (module docstring), or :class:`ConfigError` listing them."""
    if name in available:
        return name
    hits = [p + name for p in COLUMN_PREFIXES if p + name in available]
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise ConfigError(f"`where` column {name!r} is ambiguous ({hits}): write the full name")
    have = sorted(available) or "none (index with `rsprune-data index --meta FIELD,...`)"
    raise ConfigError(
        f"`where` column {name!r} is not in the index; its optional columns are {have}"
    )


def clause_mask(values: NDArray[Any], op: str, value: float) -> NDArray[np.bool_]:
    """Which samples pass one clause; NaN (missing) never passes."""
    v = np.asarray(values, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        out: NDArray[np.bool_] = np.asarray(OPERATORS[op](v, value), dtype=bool)
    passed: NDArray[np.bool_] = out & ~np.isnan(v)
    return passed


def apply_where(
    eligible: NDArray[np.bool_], columns: Mapping[str, NDArray[Any]], where: Sequence[Clause]
) -> tuple[NDArray[np.bool_], list[int]]:
    """``eligible`` narrowed by each clause in turn, and how many each clause dropped.

    Counts are sequential: clause ``j`` counts the samples still eligible after clauses ``< j``
    that it removes, so they add up to everything the filters removed.
    """
    out = np.asarray(eligible, dtype=bool).copy()
    dropped: list[int] = []
    names = list(columns)
    for col, op, value in where:
        keep = clause_mask(columns[resolve_column(col, names)], op, value)
        before = int(out.sum())
        out &= keep
        dropped.append(before - int(out.sum()))
    return out, dropped


def format_clause(clause: Clause) -> str:
    """``"cloud_cover <= 0.1"``."""
    return f"{clause[0]} {clause[1]} {clause[2]:g}"
