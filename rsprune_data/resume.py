"""Resume states of both loaders: their format, the checks on loading, and their errors (one home).

:class:`~rsprune_data.PrunedSampler` and :class:`~rsprune_data.PrunedWebDataset` save a JSON dict
``{"format", "version", "epoch", "config", "index_fingerprint", ...}``: what was delivered, of which
plan. Loading checks, in this order and with one :class:`StateDictError` each that names the fix:

1. the format and version (:func:`check_format`);
2. the settings that define the plan: index fingerprint, seed, shuffle, drop_last, world size, ...
   (:func:`check_same`); ``rank`` is informational, ranks deliver in lockstep;
3. while items of the state's epoch remain, the config of that epoch (:func:`check_config`).

The position itself (how many items of which pass) is the loader's business; the training loop
owns the epoch, as with ``DistributedSampler``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .config import PruneConfig
from .errors import StateDictError

__all__ = ["check_config", "check_format", "check_same", "state_header"]

#: Keys of every state, whatever the loader.
COMMON_KEYS = frozenset({"format", "version", "epoch", "config", "index_fingerprint"})


def state_header(
    fmt: str, version: int, epoch: int, config: PruneConfig, fingerprint: str
) -> dict[str, Any]:
    """The keys every state starts with."""
    return {
        "format": fmt,
        "version": version,
        "epoch": int(epoch),
        "config": config.to_dict(),
        "index_fingerprint": str(fingerprint),
    }


def check_format(
    state: Mapping[str, Any], *, fmt: str, version: int, required: Iterable[str], what: str
) -> dict[str, Any]:
    """A copy of ``state`` after checking its format, version and keys.

    Args:
        state: the loaded dict.
        fmt, version: what this loader writes.
        required: keys besides :data:`COMMON_KEYS`.
        what: the loader's name for messages (``"PrunedSampler"``).
    """
    if not isinstance(state, Mapping):
        raise StateDictError(
            f"a {what} state must be a dict, got {type(state).__name__}: pass the "
            f"dict returned by {what}.state_dict()"
        )
    sd = dict(state)
    missing = sorted((COMMON_KEYS | set(required)) - set(sd) - {"version"})
    if sd.get("format") != fmt or missing:
        raise StateDictError(
            f"not a {what} state (format={sd.get('format')!r}, missing keys {missing}): pass the "
            f"dict returned by {what}.state_dict()"
        )
    if sd.get("version") != version:
        raise StateDictError(
            f"{what} state version {sd.get('version')!r} is not supported (this version reads "
            f"{version}): resume with the rsprune_data version that saved it"
        )
    return sd


def check_same(sd: Mapping[str, Any], mine: Mapping[str, Any], what: str) -> None:
    """Refuse a state whose plan settings differ from this loader's (``name -> value``)."""
    for name, value in mine.items():
        if sd[name] != value:
            fix = (
                "load the same shards and index files that the state was saved with"
                if name == "index_fingerprint"
                else f"construct it with {name}={sd[name]!r}"
            )
            raise StateDictError(
                f"{what} state has {name}={sd[name]!r} but this one has {value!r}: {fix}"
            )


def check_config(sd: Mapping[str, Any], ours: PruneConfig, what: str) -> None:
    """Refuse a state with items left in its epoch whose config is not the one this loader would use."""
    theirs = PruneConfig.from_dict(sd["config"])
    if theirs != ours:
        raise StateDictError(
            f"the {what} state was saved with config {theirs.to_dict()} in epoch {sd['epoch']}, "
            f"but this one would use {ours.to_dict()}: construct it with that config (or call "
            "set_config(PruneConfig.from_dict(state['config']))) before loading"
        )
