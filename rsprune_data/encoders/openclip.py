"""``open_clip`` image towers: ``open_clip:<MODEL>`` with a checkpoint (RemoteCLIP, GeoRSCLIP, ...).

Forms:
- ``open_clip:ViT-B-32`` + ``checkpoint="/models/RemoteCLIP-ViT-B-32.pt"``: the built-in architecture
  with a local weights file (``.pt``/``.pth``/``.bin``/``.safetensors``, loaded with
  ``weights_only=True``). Never touches the network. Use the architecture name the checkpoint's
  authors give (RemoteCLIP: ViT-B-32, ViT-L-14, RN50; GeoRSCLIP: ViT-B-32, ViT-H-14).
- ``open_clip:ViT-B-32`` + ``checkpoint="laion2b_s34b_b79k"``: an open_clip pretrained tag (downloads).
- ``open_clip:hf-hub:org/repo`` (downloads) and ``open_clip:local-dir:/path`` (a folder with
  ``open_clip_config.json`` and the weights; offline).

Downloads go ahead only after a quick check that the hub answers (:mod:`._hub`), so that a machine
without network fails at once with the fix. Loading without weights is refused (``require_pretrained``):
a randomly initialised CLIP would silently produce meaningless clusters.

Preprocessing is the model's own open_clip config (size, mean, std, interpolation; OpenAI CLIP
statistics for plain checkpoint files), replicated by :class:`~rsprune_data.encoders._base.ImageTransform`.
Embeddings are ``model.encode_image`` (the projected image embedding), l2-normalised.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .._deps import lazy_import
from ..errors import ConfigError, EncoderLoadError
from . import _hub
from ._base import ImageTransform, TorchEncoder, resolve_device, weights_fingerprint

_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".npz", ".ckpt")


def _features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = model.encode_image(x)  # type: ignore[operator]
    return out


def _transform(cfg: dict[str, Any]) -> ImageTransform:
    size = cfg.get("size", 224)
    side = int(size if isinstance(size, int) else size[0])
    mode = cfg.get("resize_mode", "shortest")
    return ImageTransform(
        size=side,
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        interpolation="bilinear" if cfg.get("interpolation") == "bilinear" else "bicubic",
        # "longest" (fit and pad) differs from "squash" only for non-square images
        resize_mode="squash" if mode in ("squash", "longest") else "shortest",
    )


def _resolve_pretrained(
    open_clip: Any, arg: str, checkpoint: str | None, spec: str
) -> tuple[str | None, bool]:
    """``(pretrained argument for open_clip, needs the network)``."""
    if arg.startswith("local-dir:"):
        return None, False
    if arg.startswith("hf-hub:"):
        return None, True
    if arg not in open_clip.list_models():
        raise ConfigError(
            f"unknown open_clip model {arg!r} in {spec!r}: use an architecture name from "
            "open_clip.list_models(), e.g. ViT-B-32, ViT-L-14, ViT-H-14, RN50"
        )
    tags = open_clip.list_pretrained_tags_by_model(arg)
    if checkpoint is None:
        raise ConfigError(
            f"{spec} needs `checkpoint` (CLI: --checkpoint): a local weights file such as "
            f"RemoteCLIP-{arg}.pt, or an open_clip pretrained tag ({', '.join(tags[:4]) or 'none'})"
        )
    path = Path(checkpoint).expanduser()
    if path.is_file():
        return str(path), False
    if checkpoint in tags:
        return checkpoint, True
    if _hub.looks_like_path(checkpoint) or path.suffix in _WEIGHT_SUFFIXES:
        raise EncoderLoadError(
            f"checkpoint file {checkpoint!r} for {spec} does not exist: pass the path of "
            "the downloaded .pt file"
        )
    raise ConfigError(
        f"`checkpoint` {checkpoint!r} is neither a file nor an open_clip pretrained tag of "
        f"{arg}: pass a weights file, or one of {tags}"
    )


def load(arg: str, *, checkpoint: str | None, device: str, image_size: int | None) -> TorchEncoder:
    """Family loader used by :func:`rsprune_data.encoders.load_encoder`."""
    open_clip = lazy_import("open_clip")
    dev = resolve_device(device)
    spec = f"open_clip:{arg}"
    pretrained, online = _resolve_pretrained(open_clip, arg, checkpoint, spec)
    fix = (
        f"on a machine without network download the weights elsewhere and pass a local file: "
        f"`{spec}` with --checkpoint /path/to/weights.pt (or `open_clip:local-dir:/path`)"
    )
    if online and not _hub.offline():
        _hub.ensure_reachable(spec, fix)
    try:
        model = open_clip.create_model(
            arg,
            pretrained=pretrained,
            require_pretrained=True,
            pretrained_text=False,
            force_image_size=image_size,
            device="cpu",
            weights_only=True,
        )
    except (
        Exception
    ) as exc:  # open_clip raises RuntimeError/ValueError/OSError/KeyError for bad weights
        raise EncoderLoadError(
            f"cannot load {spec} (checkpoint={checkpoint!r}): {type(exc).__name__}: {exc}; "
            "check that the architecture matches the checkpoint" + (f"; {fix}" if online else "")
        ) from exc
    model = model.float()
    transform = _transform(open_clip.get_model_preprocess_cfg(model))
    native = (open_clip.get_model_config(arg) or {}).get("vision_cfg", {}).get("image_size")
    resized = image_size is not None and image_size != native
    size_tag = f"@{image_size}px" if resized else ""
    return TorchEncoder(
        f"{spec}@{weights_fingerprint(model)}{size_tag}",
        model,
        _features,
        transform,
        dev,
        spec=spec + size_tag,
    )
