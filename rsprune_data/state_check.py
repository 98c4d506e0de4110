"""Field-by-field validation of the resume states of :class:`PrunedSampler` and
:class:`PrunedWebDataset` (pure functions: a dict in, a checked copy out).

A state comes back from a checkpoint file that anyone may have edited, truncated or produced with
another version, so nothing in it is trusted: every field must be present with its exact type
(``True`` is not an integer, ``3.7`` is not a count, ``"3"`` is not a number) and inside its range
(``consumed`` in ``[0, num_samples]``, ``rank`` in ``[0, world_size)``, ...). A bad field raises
:class:`~rsprune_data.errors.StateDictError` naming it; before this, ``consumed=-1`` delivered 151
of 150 samples. Whether the state *fits* this loader (same index, seed, world size, config) is
checked by the loaders afterwards, on the validated copy.

``rank`` is validated but not required to equal the loading rank: ranks deliver in lockstep and
hold equally long shares, so the position of one rank is the position of every rank and one rank's
checkpoint resumes them all. ``worker`` of a per-worker state must match (the loader checks it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._validate import is_int
from .config import PruneConfig
from .errors import ConfigError, StateDictError

_FIX = "pass the dict that {what}.state_dict() returned, unchanged"


def _bad(what: str, name: str, rule: str, value: Any) -> StateDictError:
    return StateDictError(
        f"{what} state field {name!r} must be {rule}, got {value!r}: " + _FIX.format(what=what)
    )


def state_int(sd: Mapping[str, Any], name: str, what: str, lo: int, hi: int | None = None) -> int:
    """``sd[name]`` as an int in ``[lo, hi]``; a bool, a float or a string is refused."""
    value = sd[name]
    if not is_int(value) or value < lo or (hi is not None and value > hi):
        rule = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
        raise _bad(what, name, rule, value)
    return int(value)


def state_bool(sd: Mapping[str, Any], name: str, what: str) -> bool:
    """``sd[name]`` if it is a bool (``0``/``1`` are refused: a flipped type is a tampered state)."""
    value = sd[name]
    if not isinstance(value, bool):
        raise _bad(what, name, "true or false", value)
    return value


def state_str(sd: Mapping[str, Any], name: str, what: str) -> str:
    """``sd[name]`` if it is a string."""
    value = sd[name]
    if not isinstance(value, str):
        raise _bad(what, name, "a string", value)
    return value


def state_config(sd: Mapping[str, Any], what: str) -> PruneConfig:
    """``sd["config"]`` as a :class:`PruneConfig` (every setting validated by it)."""
    value = sd["config"]
    if not isinstance(value, Mapping):
        raise _bad(what, "config", "a dict from PruneConfig.to_dict()", value)
    try:
        return PruneConfig.from_dict(dict(value))
    except (ConfigError, TypeError) as exc:
        raise StateDictError(
            f"{what} state field 'config' is not a valid PruneConfig ({exc}): "
            + _FIX.format(what=what)
        ) from None


def check_header(
    state: Any, what: str, fmt: str, version: int, required: set[str]
) -> dict[str, Any]:
    """A copy of ``state`` after checking that it is a dict of format ``fmt``, version ``version``
    with every key of ``required``."""
    if not isinstance(state, Mapping):
        raise StateDictError(
            f"a {what} state must be a dict, got {type(state).__name__}: " + _FIX.format(what=what)
        )
    sd = dict(state)
    missing = sorted(required - set(sd))
    if sd.get("format") != fmt or missing:
        raise StateDictError(
            f"not a {what} state (format={sd.get('format')!r}, missing keys {missing}): "
            + _FIX.format(what=what)
        )
    if sd.get("version") != version or isinstance(sd.get("version"), bool):
        raise StateDictError(
            f"{what} state version {sd.get('version')!r} is not supported (this version reads "
            f"{version}): resume with the rsprune_data version that saved it"
        )
    return sd


SAMPLER_KEYS = {
    "format",
    "epoch",
    "consumed",
    "num_samples",
    "config",
    "seed",
    "shuffle",
    "drop_last",
    "num_replicas",
    "index_fingerprint",
}


def check_sampler_state(state: Any, fmt: str, version: int) -> dict[str, Any]:
    """A validated copy of a :meth:`PrunedSampler.state_dict` (ints as ints, config checked).

    Raises:
        StateDictError: not a dict of that format/version, a key missing, or a field of the wrong
            type or out of range (the message names it).
    """
    what = "PrunedSampler"
    sd = check_header(state, what, fmt, version, SAMPLER_KEYS)
    state_str(sd, "index_fingerprint", what)
    for name in ("shuffle", "drop_last"):
        state_bool(sd, name, what)
    sd["epoch"] = state_int(sd, "epoch", what, 0)
    sd["seed"] = state_int(sd, "seed", what, 0)
    sd["num_replicas"] = replicas = state_int(sd, "num_replicas", what, 1)
    if "rank" in sd:  # informational (module docstring), but a rank outside the world is tampered
        sd["rank"] = state_int(sd, "rank", what, 0, replicas - 1)
    sd["num_samples"] = n = state_int(sd, "num_samples", what, 0)
    sd["consumed"] = state_int(sd, "consumed", what, 0, n)
    state_config(sd, what)
    return sd


WDS_KEYS = {
    "format",
    "epoch",
    "config",
    "seed",
    "shuffle_shards",
    "drop_last",
    "world_size",
    "index_fingerprint",
    "num_workers",
}
WDS_RANK_KEYS = {"delivered", "batch_size", "items"}
WDS_WORKER_KEYS = {"worker", "rotation", "consumed", "num_samples", "finished"}


def check_wds_state(state: Any, fmt: str, version: int) -> dict[str, Any]:
    """A validated copy of a :meth:`PrunedWebDataset.state_dict`: a rank state (``delivered``
    items of ``items``) or a worker state (``consumed`` of its span's ``num_samples``).

    Raises:
        StateDictError: as :func:`check_sampler_state`.
    """
    what = "PrunedWebDataset"
    rank_state = isinstance(state, Mapping) and "delivered" in state
    sd = check_header(
        state, what, fmt, version, WDS_KEYS | (WDS_RANK_KEYS if rank_state else WDS_WORKER_KEYS)
    )
    state_str(sd, "index_fingerprint", what)
    for name in ("shuffle_shards", "drop_last"):
        state_bool(sd, name, what)
    sd["epoch"] = state_int(sd, "epoch", what, 0)
    sd["seed"] = state_int(sd, "seed", what, 0)
    sd["world_size"] = world = state_int(sd, "world_size", what, 1)
    if "rank" in sd:
        sd["rank"] = state_int(sd, "rank", what, 0, world - 1)
    sd["num_workers"] = nw = state_int(sd, "num_workers", what, 1)
    if rank_state:
        sd["batch_size"] = state_int(sd, "batch_size", what, 1)
        sd["items"] = items = state_int(sd, "items", what, 0)
        sd["delivered"] = state_int(sd, "delivered", what, 0, items)
    else:
        sd["worker"] = state_int(sd, "worker", what, 0, nw - 1)
        sd["rotation"] = state_int(sd, "rotation", what, 0, nw - 1)
        sd["num_samples"] = n = state_int(sd, "num_samples", what, 0)
        sd["consumed"] = state_int(sd, "consumed", what, 0, n)
        state_bool(sd, "finished", what)
    state_config(sd, what)
    return sd
