"""Hugging Face Hub access that fails fast: no 25-second retry loop when there is no network.

``huggingface_hub`` retries an unreachable host five times with back-off before giving up. Loaders here
first try the local cache only, and go online only after one quick request shows that the hub answers.
The standard ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` variables are honoured even when they are set
after ``huggingface_hub`` was imported (its own reading happens once, at import).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import EncoderLoadError

_TRUE = {"1", "on", "yes", "true"}
PROBE_TIMEOUT_S = 5.0


def offline() -> bool:
    """True when the user asked the Hugging Face libraries to stay offline."""
    return any(
        os.environ.get(var, "").strip().lower() in _TRUE
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def looks_like_path(name: str) -> bool:
    """A local path rather than a hub id (``org/name`` or ``name``)."""
    return (
        name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or "\\" in name
        or (len(name) > 1 and name[1] == ":")
        or Path(name).expanduser().exists()
    )


def ensure_reachable(what: str, fix: str) -> None:
    """Raise :class:`EncoderLoadError` at once when the hub cannot be used, else return.

    Args:
        what: What was being loaded, for the message (e.g. ``"hf:org/model"``).
        fix: The sentence telling the user what to do instead.
    """
    if offline():
        raise EncoderLoadError(
            f"cannot load {what}: it needs a download from the Hugging Face Hub (it is "
            f"not a local path) and HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set; {fix}"
        )
    from huggingface_hub import constants, get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=PROBE_TIMEOUT_S)
    except Exception as exc:  # any transport error (httpx, requests, proxy) means: no hub
        raise EncoderLoadError(
            f"cannot load {what}: it needs a download from the Hugging Face Hub (it is "
            f"not a local path) and {constants.ENDPOINT} is unreachable "
            f"({type(exc).__name__}: {exc}); {fix}"
        ) from exc
