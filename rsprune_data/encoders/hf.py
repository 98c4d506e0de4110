"""``transformers`` image towers: ``hf:<PATH_OR_NAME>`` (Git-RSCLIP and other SigLIP/CLIP models).

Loading:
- ``hf:/path/to/folder`` (a ``save_pretrained`` folder) never touches the network.
- ``hf:org/name`` loads from the local Hugging Face cache, else downloads, but only after a quick check
  that the hub answers, so that a machine without network gets an :class:`EncoderLoadError` naming the
  fix at once instead of a long retry loop. ``checkpoint=<folder>`` loads ``org/name`` from a folder.
- Dual encoders load only their image tower: ``siglip`` -> ``SiglipVisionModel`` (its pooled output is
  exactly ``SiglipModel.get_image_features``), ``clip`` -> ``CLIPVisionModelWithProjection`` (the
  projected embedding, as ``CLIPModel.get_image_features``). Other models load with ``AutoModel`` and
  give ``get_image_features`` when they have it, else the pooled output, else the mean token.
- Weights are cast to float32 (transformers 5 keeps the checkpoint's dtype, often bf16).

Preprocessing replicates the saved image-processor config (``preprocessor_config.json``: size, crop,
resample, mean, std) with :class:`~rsprune_data.encoders._base.ImageTransform`, which is plain torch
and safe in DataLoader workers. Without that file: model size, bicubic, mean = std = 0.5, and a warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .._deps import lazy_import
from ..errors import EncoderLoadError
from . import _hub
from ._base import ImageTransform, TorchEncoder, resolve_device, weights_fingerprint

# model_type of a dual encoder -> the class that holds just its image tower
_VISION_ONLY = {"siglip": "SiglipVisionModel", "clip": "CLIPVisionModelWithProjection"}
# PIL resample codes as saved by image processors: 2 = BILINEAR, 3 = BICUBIC, 1 = LANCZOS
_RESAMPLE = {1: "bicubic", 2: "bilinear", 3: "bicubic"}


def _pooled(out: Any) -> torch.Tensor:
    """The image embedding in whatever a transformers model returned."""
    if isinstance(out, torch.Tensor):
        return out.flatten(1)
    for attr in ("image_embeds", "pooler_output"):
        value = getattr(out, attr, None)
        if isinstance(value, torch.Tensor):
            return value.flatten(1)
    hidden = out.last_hidden_state
    pooled: torch.Tensor = hidden.mean(dim=1) if hidden.ndim == 3 else hidden.mean(dim=(2, 3))
    return pooled


class _Features:
    """``features(model, batch)`` for TorchEncoder; a class so that it carries ``interpolate_pos``."""

    def __init__(self, interpolate_pos: bool) -> None:
        self.kwargs = {"interpolate_pos_encoding": True} if interpolate_pos else {}

    def __call__(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        m: Any = model
        if hasattr(m, "get_image_features"):
            return _pooled(m.get_image_features(pixel_values=x, **self.kwargs))
        return _pooled(m(pixel_values=x, **self.kwargs))


def _side(value: Any) -> int | None:
    """Square side from an image-processor size entry (int, {height, width} or {shortest_edge})."""
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        if "shortest_edge" in value:
            return int(value["shortest_edge"])
        if "height" in value:
            return int(value["height"])
    return None


def transform_from_processor(
    proc: dict[str, Any] | None, native_size: int, image_size: int | None
) -> ImageTransform:
    """Our :class:`ImageTransform` equivalent to a saved image-processor config dict."""
    if proc is None:
        size = image_size or native_size
        return ImageTransform(
            size=size,
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
            interpolation="bicubic",
            resize_mode="squash",
        )
    resize = _side(proc.get("size")) if proc.get("do_resize", True) else None
    crop = _side(proc.get("crop_size")) if proc.get("do_center_crop", False) else None
    size = image_size or crop or resize or native_size
    shortest = isinstance(proc.get("size"), dict) and "shortest_edge" in proc["size"]
    resize_to = None if image_size is not None or crop is None or resize is None else resize
    if proc.get("do_normalize", True):
        mean = tuple(float(v) for v in proc.get("image_mean", (0.5, 0.5, 0.5)))
        std = tuple(float(v) for v in proc.get("image_std", (0.5, 0.5, 0.5)))
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return ImageTransform(
        size=size,
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
        interpolation=_RESAMPLE.get(int(proc.get("resample", 3)), "bilinear"),
        resize_mode="shortest" if shortest or crop else "squash",
        resize_to=resize_to,
    )


@contextmanager
def _quiet(transformers: Any) -> Iterator[None]:
    """No load report (it lists the text tower we skip on purpose) and no progress bar; missing
    weights are checked by the caller instead."""
    logging, verbosity = transformers.utils.logging, transformers.utils.logging.get_verbosity()
    bar = logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bar:
            logging.enable_progress_bar()


def _load_parts(src: str, local_only: bool) -> tuple[torch.nn.Module, dict[str, Any] | None, int]:
    transformers = lazy_import("transformers")
    with _quiet(transformers):
        config = transformers.AutoConfig.from_pretrained(src, local_files_only=local_only)
        cls = getattr(transformers, _VISION_ONLY.get(config.model_type, "AutoModel"))
        model, info = cls.from_pretrained(
            src, local_files_only=local_only, output_loading_info=True
        )
    missing = list(info.get("missing_keys", ()))
    if missing:  # transformers would initialise them at random: meaningless embeddings
        raise EncoderLoadError(
            f"the weights in {src!r} lack {len(missing)} tensors of {cls.__name__} "
            f"(e.g. {missing[:3]}): not a complete {config.model_type} checkpoint"
        )
    model = model.float()
    vision = getattr(config, "vision_config", config)
    native = int(getattr(vision, "image_size", 224))
    try:
        proc, _ = transformers.ImageProcessingMixin.get_image_processor_dict(
            src, local_files_only=local_only
        )
    except OSError:
        proc = None
    return model, proc, native


def load(arg: str, *, checkpoint: str | None, device: str, image_size: int | None) -> TorchEncoder:
    """Family loader used by :func:`rsprune_data.encoders.load_encoder`."""
    dev = resolve_device(device)
    spec = f"hf:{arg}"
    fix = (
        f"on a machine without network pass a local path: `hf:/path/to/model` (a folder written by "
        f"save_pretrained or `huggingface-cli download {arg} --local-dir ...`), or keep `{spec}` and add "
        f"--checkpoint /path/to/model"
    )
    source = checkpoint if checkpoint is not None else arg
    is_local = _hub.looks_like_path(source)
    if is_local and not Path(source).expanduser().is_dir():
        raise EncoderLoadError(
            f"model folder {source!r} for {spec} does not exist or is not a folder: "
            "pass the folder that holds config.json and the weights"
        )
    src = str(Path(source).expanduser()) if is_local else source
    label = Path(src).name if is_local and checkpoint is None else arg
    try:
        try:
            model, proc, native = _load_parts(src, local_only=True)
        except OSError:
            if is_local:
                raise
            _hub.ensure_reachable(spec, fix)
            model, proc, native = _load_parts(src, local_only=False)
    except EncoderLoadError:
        raise
    except (
        Exception
    ) as exc:  # transformers raises OSError, ValueError, KeyError, ... for bad folders
        raise EncoderLoadError(
            f"cannot load {spec} from {src!r}: {type(exc).__name__}: {exc}; {fix}"
        ) from exc
    if proc is None:
        warnings.warn(
            f"{spec}: no preprocessor_config.json, using {native}px bicubic with mean = std = 0.5",
            stacklevel=3,
        )
    transform = transform_from_processor(proc, native, image_size)
    resized = image_size is not None and image_size != native
    size_tag = f"@{image_size}px" if resized else ""
    return TorchEncoder(
        f"hf:{label}@{weights_fingerprint(model)}{size_tag}",
        model,
        _Features(interpolate_pos=resized),
        transform,
        dev,
        spec=spec + size_tag,
    )
