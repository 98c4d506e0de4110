"""Torch pieces shared by the encoder families: the picklable preprocessing and the encode loop.

Imported only by the family modules, so ``import rsprune_data.encoders`` stays free of torch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

from ..errors import ConfigError

_MODES = ("shortest", "squash")
_INTERPOLATIONS = ("bicubic", "bilinear")


@dataclass(frozen=True)
class ImageTransform:
    """``HxWx3`` uint8 RGB -> normalised ``[3, S, S]`` float32 tensor; no model inside, so it pickles.

    ``resize_mode="shortest"`` scales the shorter side to ``resize_to`` (default ``size``) and takes the
    centre ``size x size`` crop (CLIP's convention); ``"squash"`` resizes to ``size x size``. Both are
    the same for square tiles, the usual case in remote sensing. Resizing is antialiased (as PIL does when downscaling); an image already at
    ``size x size`` is not resampled. Output: ``(rgb / 255 - mean) / std``.

    Example:
        >>> t = ImageTransform(size=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
        >>> t(np.zeros((16, 16, 3), np.uint8)).shape
        torch.Size([3, 8, 8])
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    resize_mode: str = "shortest"
    resize_to: int | None = None

    def __post_init__(self) -> None:
        if self.interpolation not in _INTERPOLATIONS:
            raise ConfigError(
                f"`interpolation` must be one of {_INTERPOLATIONS}, got {self.interpolation!r}"
            )
        if self.resize_mode not in _MODES:
            raise ConfigError(f"`resize_mode` must be one of {_MODES}, got {self.resize_mode!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError(
                f"`mean`/`std` must be 3 numbers with std > 0, got {self.mean!r}, {self.std!r}"
            )
        if self.resize_to is not None and self.resize_to < self.size:
            raise ConfigError(
                f"`resize_to` must be >= size={self.size} or None, got {self.resize_to!r}"
            )

    def __call__(self, rgb: NDArray[np.uint8]) -> torch.Tensor:
        if not (
            isinstance(rgb, np.ndarray)
            and rgb.dtype == np.uint8
            and rgb.ndim == 3
            and rgb.shape[2] == 3
            and rgb.shape[0] > 0
            and rgb.shape[1] > 0
        ):
            got = (
                f"{rgb.dtype} array of shape {rgb.shape}"
                if isinstance(rgb, np.ndarray)
                else type(rgb).__name__
            )
            raise ConfigError(
                f"`rgb` must be an HxWx3 uint8 array (images.decode_rgb output), got {got}"
            )
        s = self.size
        x = torch.from_numpy(rgb.astype(np.float32)).permute(2, 0, 1)  # [3, H, W], 0..255, a copy
        h, w = rgb.shape[:2]
        if self.resize_mode == "squash":
            out_hw = (s, s)
        else:
            r = s if self.resize_to is None else self.resize_to
            scale = r / min(h, w)
            out_hw = (
                max(r, int(h * scale)),
                max(r, int(w * scale)),
            )  # int(): as torchvision and HF
        if (h, w) != out_hw:
            x = F.interpolate(
                x[None], size=out_hw, mode=self.interpolation, antialias=True, align_corners=False
            )[0]
            if (
                self.interpolation == "bicubic"
            ):  # cubic overshoots; PIL clamps to the uint8 range too
                x = x.clamp_(0.0, 255.0)
        top, left = (out_hw[0] - s) // 2, (out_hw[1] - s) // 2
        x = x[:, top : top + s, left : left + s]
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1) * 255.0
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1) * 255.0
        return ((x - mean) / std).contiguous()


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> CUDA when available else CPU; anything else is checked and returned."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(
            f"`device` must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}"
        ) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"`device` is {device!r} but torch sees no CUDA GPU: pass device='cpu' or 'auto'"
        )
    return dev


def weights_fingerprint(module: torch.nn.Module) -> str:
    """8 hex digits identifying a model's weights, cheap even for large models.

    Hashes every tensor's name, shape, dtype and its first and last 64 values, which changes with any
    training of that tensor; independent of the file format and of where the file lives.
    """
    h = hashlib.sha256()
    for key, value in module.state_dict().items():
        flat = value.detach().reshape(-1)
        head = flat[:64].float().cpu().numpy().tobytes()
        tail = flat[-64:].float().cpu().numpy().tobytes()
        h.update(f"{key}|{tuple(value.shape)}|{value.dtype}|".encode())
        h.update(head + tail)
    return h.hexdigest()[:8]


class TorchEncoder:
    """An :class:`~rsprune_data.encoders.Encoder` around a torch module and a features function.

    Args:
        name: Encoder id (see :class:`~rsprune_data.encoders.Encoder`).
        module: The model, moved to ``device`` and put in eval mode here.
        features: ``features(module, batch) -> [n, d]`` raw (not yet normalised) embeddings.
        transform: The preprocessing, exposed as ``preprocess``.
        device: Where ``encode`` runs.
        channels_last: Feed NHWC batches (about 3x faster for EfficientNet-Lite0 on CPU).
        spec: The ``load_encoder`` spec that rebuilds this encoder (with the same ``checkpoint``);
            defaults to ``name``.
    """

    def __init__(
        self,
        name: str,
        module: torch.nn.Module,
        features: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor],
        transform: ImageTransform,
        device: torch.device,
        *,
        channels_last: bool = False,
        spec: str | None = None,
    ) -> None:
        self.name = name
        self.spec = name if spec is None else spec
        self.device = device
        self.image_size = transform.size
        self.preprocess = transform
        self.channels_last = channels_last
        self.module = module.eval().to(device)
        if channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)
        self._features = features
        self.dim = int(self._raw(torch.zeros(1, 3, self.image_size, self.image_size)).shape[1])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, dim={self.dim}, image_size={self.image_size}, "
            f"device={str(self.device)!r})"
        )

    def _prepare(self, batch: torch.Tensor) -> torch.Tensor:
        s = self.image_size
        if not (
            isinstance(batch, torch.Tensor)
            and batch.ndim == 4
            and tuple(batch.shape[1:]) == (3, s, s)
        ):
            got = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
            raise ConfigError(
                f"`batch` must be a [n, 3, {s}, {s}] tensor of preprocess() outputs, got {got}"
            )
        x = batch.to(self.device, dtype=torch.float32, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    @torch.inference_mode()
    def _raw(self, batch: torch.Tensor) -> torch.Tensor:
        return self._features(self.module, self._prepare(batch)).float()

    def encode(self, batch: torch.Tensor) -> NDArray[np.float32]:
        """l2-normalised float32 embeddings ``[n, d]`` of a preprocessed batch."""
        if isinstance(batch, torch.Tensor) and batch.ndim == 4 and batch.shape[0] == 0:
            return np.zeros((0, self.dim), np.float32)
        feats = F.normalize(self._raw(batch), dim=1)
        return feats.cpu().numpy().astype(np.float32, copy=False)
